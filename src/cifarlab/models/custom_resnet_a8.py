"""Assignment 8's variant of the custom ResNet, as its write-up prints it.

Source: seed 000_7d5530676d166a7a.txt (torchsummary table, 6,575,370 parameters):

    PrepLayer  conv 3x3 64 -> BN -> ReLU                                           32x32
    Layer1     conv 3x3 128 -> maxpool 3/2/1 -> BN -> ReLU = X;  X + ResBlock(X)   32 -> 16
    Layer2     conv 3x3 256, *no padding* -> maxpool 3/2/1 -> BN -> ReLU           16 -> 14 -> 7
    Layer3     conv 3x3 512 -> maxpool 3/2/1 -> BN -> ReLU = X;  X + ResBlock(X)   7 -> 4
    maxpool 4 -> flatten -> FC 512 -> 10   (softmax is in the loss)

    ResBlock(X) = ReLU(X + BN(conv(ReLU(BN(conv(X))))))

How it differs from custom_resnet.py (assignment 10), all of it read off the table:

* every conv has a bias: 1,792 = 3*64*9 + 64 etc.; the 2,240 biases are exactly the gap
  between 6,575,370 and 6,573,130;
* layer 2's conv is unpadded (the table's 16x16 -> 14x14), so layer 3 starts from 7x7;
* the pools are MaxPool2d(3, stride 2, padding 1), which takes 32 -> 16, 14 -> 7 and 7 -> 4
  (a plain MaxPool2d(2) would give 7 -> 3, not the printed 4);
* the residual block has no ReLU between its second BN and the add; its only ReLU comes after
  the add (the table's Conv-BN-ReLU-Conv-BN-ReLU, then the `ResBlock` row).

The pool kernel and the block's forward are not visible in a torchsummary table; they follow
the code the write-up ran (sunandhini96/Main_Models, Models/custom_resnet.py), whose shapes and
layer order match the table row for row. That code adds the skip twice: the block returns
ReLU(X + R(X)) and the layer then adds X again. This is reproduced as it ran. It also ends in
log_softmax (dropped here: registry models return logits) and defines an unused `fc` Linear
(5,130 parameters) and MaxPool2d that never run: torchsummary counts only modules that run, so
the printed 6,575,370 excludes them, while that model's `parameters()` would have summed to
6,580,500. They are left out, so this model has exactly the printed 6,575,370.

The seed used no dropout; `dropout` > 0 adds one after each conv-BN-ReLU, as in custom_resnet.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cifarlab.models.conv import Conv2d
from cifarlab.models.custom_resnet import conv_bn_relu
from cifarlab.models.registry import register_model


def a8_conv(c_in: int, c_out: int, pool: bool = False, dropout: float = 0.0,
            padding: int = 1) -> nn.Sequential:
    """conv 3x3 with bias [-> maxpool 3, stride 2, pad 1] -> BN -> ReLU [-> dropout]."""
    return conv_bn_relu(c_in, c_out, pool, dropout, bias=True, padding=padding, pool_kernel=3)


class ResBlock(nn.Module):
    """ReLU(x + BN(conv(ReLU(BN(conv(x)))))): shape-preserving, convs with bias."""

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = a8_conv(channels, channels, dropout=dropout)
        self.conv2 = nn.Sequential(Conv2d(channels, channels, 3, padding=1, bias=True),
                                   nn.BatchNorm2d(channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.conv1(x)))


class ResidualLayerA8(nn.Module):
    """X = a8_conv(pool); return X + ResBlock(X), the seed's double skip."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__()
        self.conv = a8_conv(c_in, c_out, pool=True, dropout=dropout)
        self.res = ResBlock(c_out, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x + self.res(x)


class CustomResNetA8(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.prep = a8_conv(3, 64, dropout=dropout)                              # [N, 64, 32, 32]
        self.layer1 = ResidualLayerA8(64, 128, dropout)                           # [N, 128, 16, 16]
        self.layer2 = a8_conv(128, 256, pool=True, dropout=dropout, padding=0)    # [N, 256, 7, 7]
        self.layer3 = ResidualLayerA8(256, 512, dropout)                          # [N, 512, 4, 4]
        self.pool = nn.MaxPool2d(4)                                               # [N, 512, 1, 1]
        self.flatten = nn.Flatten()                                               # [N, 512]
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(self.flatten(self.pool(x)))


@register_model(cam_layer="layer3",
                source="seed 000_7d5530676d166a7a.txt (assignment 8)")
def custom_resnet_a8(num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    return CustomResNetA8(num_classes, dropout)
