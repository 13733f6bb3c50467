"""The LR range test (torch-lr-finder), stopped once the loss has clearly turned up, and the
lr_find stage's work around it (`find_max_lr`).

The rules that read its curve live in `cifarlab.config.lr_rules`; the raw loss minimum is never a
suggestion (the seeds' assignment 8 trained at it and diverged).
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np
import torch
from torch_lr_finder import LRFinder
from torch_lr_finder.lr_finder import TrainDataLoaderIter

from cifarlab import paths
from cifarlab.atomic import atomic_path, write_json
from cifarlab.config.lr_rules import suggestions, window
from cifarlab.config.params import LrFindParams, Params
from cifarlab.data.loaders import train_loader
from cifarlab.data.subset import load_subset
from cifarlab.engine.classifier import build_model
from cifarlab.engine.runtime import Runtime, seed_everything, select_runtime
from cifarlab.engine.schedule import build_optimizer


def turned_up(losses: Sequence[float], rebound: float) -> bool:
    """Has the smoothed loss clearly turned up? True once the latest value is not finite, or has
    climbed back `rebound` of the way from its lowest point to where it started (at least
    `rebound` x 20% of the start, so a curve that never fell still stops when it blows up).

    A multiple of the best loss (torch-lr-finder's `diverge_th`) is not enough: after divergence
    a network saturates and its loss drifts back toward ln 10, which on real CIFAR-10 never
    reached 5x the minimum, and the curve fell again past it.
    """
    if not losses:
        return False
    latest = float(losses[-1])
    if not np.isfinite(latest):
        return True
    start, lowest = float(losses[0]), float(np.min(losses))
    return latest > lowest + rebound * max(start - lowest, 0.2 * abs(start))


class _TurnedUp(Exception):
    pass


class _StoppingFinder(LRFinder):
    """torch-lr-finder's range test, stopped by `turned_up` before each further batch."""

    def __init__(self, *args, rebound: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.rebound = rebound

    def _train_batch(self, *args, **kwargs):
        if turned_up(self.history["loss"], self.rebound):
            raise _TurnedUp
        return super()._train_batch(*args, **kwargs)


def range_test(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader, runtime: Runtime,
               params: LrFindParams, label_smoothing: float = 0.0) -> tuple[list[float], list[float]]:
    """Run the range test and return (lrs, smoothed losses). The model is restored afterwards."""
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    amp = {}
    if runtime.autocast_dtype is not None:
        amp = {"amp_backend": "torch",
               "amp_config": {"device_type": runtime.device.type, "dtype": runtime.autocast_dtype},
               "grad_scaler": torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler())}
    if not isinstance(loader, torch.utils.data.DataLoader):
        loader = TrainDataLoaderIter(loader)   # the batch path's epoch (loaders.DeviceBatchLoader)
    finder = _StoppingFinder(model, optimizer, criterion, device=runtime.device, rebound=params.stop_rebound, **amp)
    # torch-lr-finder prints advice meant for its own plotting API ("See the graph with ..."): not ours.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            finder.range_test(loader, start_lr=params.start_lr, end_lr=params.end_lr, num_iter=params.num_iter,
                              step_mode=params.step_mode, smooth_f=params.smooth_f, diverge_th=1e12)
        except _TurnedUp:
            pass
    lrs, losses = list(finder.history["lr"]), list(finder.history["loss"])
    finder.reset()  # the measured model must not leave the range test trained
    return lrs, losses


def find_max_lr(params: Params) -> dict:
    """The lr_find stage's work: the range test with the training model, optimizer, batch size and
    augmentation; writes the curve (plots/lr_find.csv) and metrics/lr_find.json and returns the latter."""
    runtime = select_runtime(params.runtime)
    dataset = load_subset(paths.DATA_DIR, train=params.data.train_subset)
    seed_everything(params.train.seed)
    loader = train_loader(dataset.train, params.augment, params.train.batch_size,
                          params.train.seed, runtime)
    model = build_model(params.model, runtime, len(dataset.classes), dataset.train.images)
    optimizer = build_optimizer(model, params.optim, lr=params.lr_find.start_lr)
    lrs, losses = range_test(model, optimizer, loader.epoch(0), runtime, params.lr_find,
                             params.optim.label_smoothing)
    descent = window(lrs, losses)          # a curve with no usable descent stops here with one line
    candidates = suggestions(descent)
    rule = params.lr_find.rule
    max_lr = candidates[rule]
    with atomic_path(paths.LR_FIND_CURVE) as tmp:
        tmp.write_text("lr,loss\n" + "".join(f"{lr!r},{loss!r}\n" for lr, loss in zip(lrs, losses)))
    found = {
        "max_lr": max_lr, "rule": rule, "suggestions": candidates, "loss_minimum_lr": descent.minimum_lr,
        "window": list(descent.bounds), "iterations": len(lrs),
        "stopped_early": len(lrs) < params.lr_find.num_iter}
    write_json(paths.LR_FIND_METRICS, found)
    print(f"lr_find: max_lr {max_lr:.3e} by rule `{rule}` "
          f"({', '.join(f'{k} {v:.2e}' for k, v in candidates.items())}; loss minimum at {descent.minimum_lr:.2e}, "
          f"{len(lrs)} of {params.lr_find.num_iter} iterations)")
    return found
