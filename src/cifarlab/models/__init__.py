"""Model registry: a name in params.yaml -> a small factory, one file per family.

`model.name` is checked against this registry when params load, so an unknown name fails before
any work starts. Each entry also names the layer Grad-CAM should look at, so evaluation never
hard-codes a module path.

A model's name is its module's name, and FAMILIES lists the modules: the names are known without
importing torch (the download and max_lr stages validate params and never build a model), and
looking a model up imports its module, which registers it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    import torch.nn as nn

# The model families, one module each in this package. Keep one name per file here.
FAMILIES = ("custom_resnet", "a7_net", "custom_resnet_a8", "resnet18", "fast_net")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    cam_layer: str      # dotted path of the module whose activations Grad-CAM uses
    source: str         # which seed write-up the architecture reproduces
    whitening: Optional[str] = None   # dotted path of a frozen whitening conv whose bias trains (optim.whiten_bias_epochs)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(*, cam_layer: str, source: str, whitening: Optional[str] = None):
    """Decorator: register `factory(num_classes=10, dropout=0.0) -> nn.Module` under its module's
    name (a module of FAMILIES)."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = factory.__module__.rpartition(".")[2]
        if name not in FAMILIES:
            raise ValueError(f"model module `{factory.__module__}` is not in cifarlab.models.FAMILIES")
        if name in _REGISTRY:
            raise ValueError(f"model `{name}` is registered twice")
        _REGISTRY[name] = ModelSpec(name, factory, cam_layer, source, whitening)
        return factory

    return wrap


def model_names() -> list[str]:
    return sorted(FAMILIES)


def model_spec(name: str) -> ModelSpec:
    if name not in FAMILIES:
        raise KeyError(f"unknown model `{name}`; registered: {', '.join(model_names())}")
    if name not in _REGISTRY:
        importlib.import_module(f"{__name__}.{name}")      # registers it
    return _REGISTRY[name]


def create_model(name: str, num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    return model_spec(name).factory(num_classes=num_classes, dropout=dropout)


def cam_layer(model: nn.Module, name: str) -> nn.Module:
    """The module Grad-CAM should hook for a model built from registry entry `name`."""
    return model.get_submodule(model_spec(name).cam_layer)
