"""Model registry: a name in params.yaml -> a small factory, one file per family.

`model.name` is checked against this registry when params load, so an unknown name fails before
any work starts. Each entry also names the layer Grad-CAM should look at, so evaluation never
hard-codes a module path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    cam_layer: str      # dotted path of the module whose activations Grad-CAM uses
    source: str         # which seed write-up the architecture reproduces
    whitening: Optional[str] = None   # dotted path of a frozen whitening conv whose bias trains (optim.whiten_bias_epochs)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, cam_layer: str, source: str, whitening: Optional[str] = None):
    """Decorator: register `factory(num_classes=10, dropout=0.0) -> nn.Module` under `name`."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model `{name}` is registered twice")
        _REGISTRY[name] = ModelSpec(name, factory, cam_layer, source, whitening)
        return factory

    return wrap


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model `{name}`; registered: {', '.join(model_names())}")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    return model_spec(name).factory(num_classes=num_classes, dropout=dropout)


def cam_layer(model: nn.Module, name: str) -> nn.Module:
    """The module Grad-CAM should hook for a model built from registry entry `name`."""
    return model.get_submodule(model_spec(name).cam_layer)


# Importing the families registers them. Keep one import per file in this package.
from cifarlab.models import custom_resnet  # noqa: E402,F401
from cifarlab.models import a7_net  # noqa: E402,F401
from cifarlab.models import custom_resnet_a8  # noqa: E402,F401
from cifarlab.models import resnet18  # noqa: E402,F401
from cifarlab.models import fast_net  # noqa: E402,F401

