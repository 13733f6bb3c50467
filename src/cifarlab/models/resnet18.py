"""ResNet-18 for 32x32 inputs, in the shape of kuangliu/pytorch-cifar's `ResNet18()`.

Source: seed 004_ca5c2c8e2cd39bc0.txt (session 11; torchinfo table, 11,173,962 parameters):

    stem    conv 3x3 64 (stride 1, no max-pool) -> BN -> ReLU                 32x32
    layer1  BasicBlock 64  x2, stride 1                                        32x32
    layer2  BasicBlock 128 x2, first stride 2                                  16x16
    layer3  BasicBlock 256 x2, first stride 2                                  8x8
    layer4  BasicBlock 512 x2, first stride 2                                  4x4
    avg-pool 4 -> FC 512 -> 10   (softmax is in the loss)

    BasicBlock(x) = ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x))
    shortcut      = identity (an empty Sequential), or conv 1x1 (stride) -> BN when the
                    shape changes (the table's 8,448 = 64*128 + 2*128 etc.)

Convs have no bias; ReLUs and the pooling are functional, so the table has no rows for them.
The seed used no dropout; `dropout` > 0 adds one after each BasicBlock.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cifarlab.models.conv import Conv2d
from cifarlab.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.conv1 = Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))
        return self.drop(out) if self.drop is not None else out


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.conv1 = Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._stage(64, 64, 1, dropout)      # [N, 64, 32, 32]
        self.layer2 = self._stage(64, 128, 2, dropout)     # [N, 128, 16, 16]
        self.layer3 = self._stage(128, 256, 2, dropout)    # [N, 256, 8, 8]
        self.layer4 = self._stage(256, 512, 2, dropout)    # [N, 512, 4, 4]
        self.linear = nn.Linear(512, num_classes)

    @staticmethod
    def _stage(c_in: int, c_out: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(BasicBlock(c_in, c_out, stride, dropout),
                             BasicBlock(c_out, c_out, 1, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.avg_pool2d(x, 4)                                # [N, 512, 1, 1]
        return self.linear(torch.flatten(x, 1))


@register_model(cam_layer="layer4", source="seed 004_ca5c2c8e2cd39bc0.txt (session 11)")
def resnet18(num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    return ResNet18(num_classes, dropout)
