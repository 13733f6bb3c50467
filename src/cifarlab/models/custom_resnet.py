"""The "custom ResNet" of David Page's DAWNBench CIFAR-10 entry, as assignment 10 specifies it.

Source: seeds 002_83aa6d7748cf0418.txt and 003_35b08997a8aa459e.txt (6,573,130 parameters):

    PrepLayer  conv 3x3 64 -> BN -> ReLU
    Layer1     conv 3x3 128 -> maxpool 2 -> BN -> ReLU = X;  X + ResBlock(conv-BN-ReLU x2)
    Layer2     conv 3x3 256 -> maxpool 2 -> BN -> ReLU
    Layer3     conv 3x3 512 -> maxpool 2 -> BN -> ReLU = X;  X + ResBlock(conv-BN-ReLU x2)
    maxpool 4 -> FC 512 -> 10   (softmax is in the loss)

Convolutions have no bias (BN follows each). Dropout after each block is optional (003 used it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cifarlab.models.conv import Conv2d
from cifarlab.models.registry import register_model


def conv_bn_relu(c_in: int, c_out: int, pool: bool = False, dropout: float = 0.0, *,
                 bias: bool = False, padding: int = 1, pool_kernel: int = 2) -> nn.Sequential:
    """conv 3x3 (pad 1, no bias) [-> maxpool 2] -> BN -> ReLU [-> dropout].

    The keywords exist for the assignment-8 variant (custom_resnet_a8.py): `bias` and `padding`
    go to the conv; `pool_kernel` 3 gives the overlapping MaxPool2d(3, stride 2, padding 1). The
    pool always has stride 2; the defaults reproduce the plain MaxPool2d(2) above exactly.
    """
    layers: list[nn.Module] = [Conv2d(c_in, c_out, 3, padding=padding, bias=bias)]
    if pool:
        layers.append(nn.MaxPool2d(pool_kernel, stride=2, padding=(pool_kernel - 1) // 2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ResidualLayer(nn.Module):
    """X = conv_bn_relu(pool); return X + (conv-BN-ReLU-conv-BN-ReLU)(X)."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.conv = conv_bn_relu(c_in, c_out, pool=True, dropout=dropout)
        self.res = nn.Sequential(conv_bn_relu(c_out, c_out, dropout=dropout),
                                 conv_bn_relu(c_out, c_out, dropout=dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x + self.res(x)


class CustomResNet(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.prep = conv_bn_relu(3, 64, dropout=dropout)                 # [N, 64, 32, 32]
        self.layer1 = ResidualLayer(64, 128, dropout)                     # [N, 128, 16, 16]
        self.layer2 = conv_bn_relu(128, 256, pool=True, dropout=dropout)  # [N, 256, 8, 8]
        self.layer3 = ResidualLayer(256, 512, dropout)                    # [N, 512, 4, 4]
        self.pool = nn.MaxPool2d(4)                                       # [N, 512, 1, 1]
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model(cam_layer="layer3", source="seeds 002/003 (assignment 10)")
def custom_resnet(num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    return CustomResNet(num_classes, dropout)
