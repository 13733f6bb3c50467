"""The `fast` preset's network: a whitened 8-layer convnet after airbench94.

Source: K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU" (2024, arXiv:2404.00498),
which builds on D. Page's DAWNBench ResNet (2018) and tysam-code's hlb-CIFAR10; written here from
the paper's description, 1,972,792 parameters by construction:

    whiten  conv 2x2 3->24, no padding (frozen: eigenvectors of the training images' 2x2 patch
            covariance, scaled to unit variance, and their negatives) + bias -> GELU     32 -> 31
    group1  conv 3x3 24->64 -> maxpool 2 -> BN -> GELU -> conv 3x3 64->64 -> BN -> GELU   31 -> 15
    group2  the same, 64->256                                                           15 -> 7
    group3  the same, 256->256                                                           7 -> 3
    head    maxpool 3 -> linear 256->10 (no bias) -> x 1/9                                3 -> 1

BatchNorm scales are frozen at 1 (only the shifts learn) with fast running statistics
(momentum 0.4, eps 1e-12); convs have no bias and start as identity (dirac) on their first input
channels. `init_from_data` must be called with training images before training: without it the
first layer is a random, frozen projection.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from cifarlab.models.conv import Conv2d
from cifarlab.models.registry import register_model

WIDTHS = (64, 256, 256)
WHITEN_CHANNELS = 24          # 12 eigenvectors of the 3 x 2 x 2 patch covariance, and their negatives
WHITEN_EPS = 5e-4             # added to the eigenvalues before scaling
LOGIT_SCALE = 1 / 9
BN_MOMENTUM = 0.4             # torch's convention: the weight of the new batch's statistics
BN_EPS = 1e-12


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    norm.weight.requires_grad_(False)      # scale frozen at 1: only the shift learns
    return norm


def _conv(c_in: int, c_out: int) -> Conv2d:
    conv = Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:c_in])   # identity on the first c_in output channels
    return conv


class ConvGroup(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        layers = [("conv1", _conv(c_in, c_out)), ("pool", nn.MaxPool2d(2)), ("norm1", _batch_norm(c_out)),
                  ("act1", nn.GELU()), ("conv2", _conv(c_out, c_out)), ("norm2", _batch_norm(c_out)),
                  ("act2", nn.GELU())]
        if dropout > 0:
            layers.append(("dropout", nn.Dropout(dropout)))
        super().__init__(OrderedDict(layers))


class FastNet(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.whiten = Conv2d(3, WHITEN_CHANNELS, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()
        groups, c_in = [], WHITEN_CHANNELS
        for i, width in enumerate(WIDTHS, start=1):
            groups.append((f"group{i}", ConvGroup(c_in, width, dropout)))
            c_in = width
        self.groups = nn.Sequential(OrderedDict(groups))
        self.pool = nn.MaxPool2d(3)
        self.fc = nn.Linear(c_in, num_classes, bias=False)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the frozen whitening filters from normalised training images [N, 3, H, W]: the 2x2
        patch covariance's eigenvectors divided by the square root of their eigenvalues, and their
        negatives, so the layer's outputs are decorrelated with unit variance."""
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)              # N, 3, H-1, W-1, 2, 2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * 2 * 2).double()
        patches = patches - patches.mean(0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)             # ascending
        filters = (eigenvectors.T / (eigenvalues + WHITEN_EPS).sqrt()[:, None]).flip(0)
        filters = filters.reshape(-1, 3, 2, 2).to(self.whiten.weight)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.act(self.whiten(x)))
        return self.fc(self.pool(x).flatten(1)) * LOGIT_SCALE


@register_model(cam_layer="groups.group3.conv1",
                source="airbench94 (Jordan 2024), the fast preset; not a seed write-up")
def fast_net(num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    return FastNet(num_classes, dropout)
