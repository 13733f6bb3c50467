"""The model every stage trains and evaluates: a registered network behind the shared input
normalisation, so every consumer feeds raw uint8-range images and none can normalise twice."""

from __future__ import annotations

import torch
from torch import nn

from cifarlab.models import create_model, model_spec
from cifarlab.params import ModelParams
from cifarlab.runtime import Runtime
from cifarlab.storage import CIFAR_MEAN, CIFAR_STD


class Normalize(nn.Module):
    """uint8-range images [N, 3, H, W] -> float, standardised with the CIFAR-10 statistics."""

    def __init__(self, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class Classifier(nn.Module):
    """A registered network behind the shared input normalisation: takes uint8-range images."""

    def __init__(self, name: str, dropout: float = 0.0, num_classes: int = 10):
        super().__init__()
        self.arch = name
        self.normalize = Normalize()
        self.net = create_model(name, num_classes=num_classes, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def cam_layer(self) -> nn.Module:
        return self.net.get_submodule(model_spec(self.arch).cam_layer)


def prepare_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_model(params: ModelParams, runtime: Runtime, num_classes: int) -> Classifier:
    """A fresh model from params, on the runtime's device and memory format."""
    return prepare_model(Classifier(params.name, params.dropout, num_classes), runtime)
