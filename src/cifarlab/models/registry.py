"""Model registry: a name in params.yaml -> a small factory, one file per family.

Each entry also names the layer Grad-CAM should look at, so evaluation never hard-codes a module
path. A model's name is its module's name (`names.FAMILIES`), and looking a model up imports its
module, which registers it: this module depends on every network in its folder.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from cifarlab.models.names import FAMILIES, WHITENING, model_names

if TYPE_CHECKING:
    import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    cam_layer: str      # dotted path of the module whose activations Grad-CAM uses
    source: str         # which seed write-up the architecture reproduces
    whitening: Optional[str] = None   # names.WHITENING: a frozen whitening conv whose bias trains (optim.whiten_bias_epochs)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(*, cam_layer: str, source: str):
    """Decorator: register `factory(num_classes=10, dropout=0.0) -> nn.Module` under its module's
    name (a module of FAMILIES)."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = factory.__module__.rpartition(".")[2]
        if name not in FAMILIES:
            raise ValueError(f"model module `{factory.__module__}` is not in cifarlab.models.names.FAMILIES")
        if name in _REGISTRY:
            raise ValueError(f"model `{name}` is registered twice")
        _REGISTRY[name] = ModelSpec(name, factory, cam_layer, source, WHITENING.get(name))
        return factory

    return wrap


def model_spec(name: str) -> ModelSpec:
    if name not in FAMILIES:
        raise KeyError(f"unknown model `{name}`; registered: {', '.join(model_names())}")
    if name not in _REGISTRY:
        importlib.import_module(f"{__package__}.{name}")      # registers it
    return _REGISTRY[name]


def create_model(name: str, num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    return model_spec(name).factory(num_classes=num_classes, dropout=dropout)


def cam_layer(model: nn.Module, name: str) -> nn.Module:
    """The module Grad-CAM should hook for a model built from registry entry `name`."""
    return model.get_submodule(model_spec(name).cam_layer)


def main(argv: list[str] | None = None) -> int:
    """`python -m cifarlab models`: list the registered models with their parameter counts."""
    import argparse

    argparse.ArgumentParser(prog="python -m cifarlab models", description=main.__doc__.split(": ")[1]).parse_args(argv)
    for name in model_names():
        count = sum(p.numel() for p in create_model(name).parameters())
        print(f"{name:20s} {count:>12,d}  {model_spec(name).source}")
    return 0
