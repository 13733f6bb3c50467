"""The model every stage trains and evaluates: a registered network behind the shared input
normalisation, so every consumer feeds raw uint8-range images and none can normalise twice."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from cifarlab.config.params import ModelParams
from cifarlab.data.storage import CIFAR_MEAN, CIFAR_STD
from cifarlab.engine.runtime import Runtime
from cifarlab.models.registry import create_model, model_spec


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

    def train_whitening_bias(self, trainable: bool) -> None:
        """Let the whitening conv's bias (registry `whitening`) train, or freeze it: a frozen one gets no
        gradient, so nothing before the first conv group needs one and its input gradient is skipped."""
        self.net.get_submodule(model_spec(self.arch).whitening).bias.requires_grad_(trainable)

    @property
    def needs_data_init(self) -> bool:
        """Whether the network sets some weights from training images (e.g. fast_net's whitening)."""
        return hasattr(self.net, "init_from_data")

    @torch.no_grad()
    def init_from_data(self, images: np.ndarray) -> None:
        """Let the network set its data-dependent weights from uint8 HWC training images [N, H, W, 3]
        (normalised here as in `forward`); a no-op for networks without such weights."""
        if self.needs_data_init:
            batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
            device = next(self.parameters()).device
            self.net.init_from_data(self.normalize(batch.to(device)))


def prepare_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


DATA_INIT_IMAGES = 5000   # training images a data-dependent initialisation reads (airbench94 uses 5000)


def build_model(params: ModelParams, runtime: Runtime, num_classes: int,
                train_images: Optional[np.ndarray] = None) -> Classifier:
    """A fresh model from params, on the runtime's device and memory format; a network with
    data-dependent weights is initialised from the first DATA_INIT_IMAGES of `train_images`."""
    model = Classifier(params.name, params.dropout, num_classes)
    if model.needs_data_init:
        if train_images is None:
            raise ValueError(f"model {params.name} initialises from training images: pass train_images")
        model.init_from_data(train_images[:DATA_INIT_IMAGES])
    return prepare_model(model, runtime)
