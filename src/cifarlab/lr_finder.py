"""The LR range test (torch-lr-finder) and the rules that turn its curve into a max LR.

The raw loss minimum is never the suggestion: at that LR the loss is about to blow up, and
OneCycle spends a third of a run near its peak (the seeds' assignment 8 took 0.69 from the
minimum and diverged). Every rule below picks an LR on the descending part of the curve.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch_lr_finder import LRFinder

from cifarlab.engine import Runtime
from cifarlab.errors import CifarlabError
from cifarlab.params import LrFindParams

SKIP_START = 10  # points trimmed from the start (noisy) ...
SKIP_END = 5     # ... and the end (diverging) before a rule looks at the curve
RULES = ("steepest", "valley", "min_div_10")


def range_test(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader, runtime: Runtime,
               params: LrFindParams, label_smoothing: float = 0.0) -> tuple[list[float], list[float]]:
    """Run the range test and return (lrs, smoothed losses). The model is restored afterwards."""
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    amp = {}
    if runtime.autocast_dtype is not None:
        amp = {"amp_backend": "torch",
               "amp_config": {"device_type": runtime.device.type, "dtype": runtime.autocast_dtype},
               "grad_scaler": torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler())}
    finder = LRFinder(model, optimizer, criterion, device=runtime.device, **amp)
    finder.range_test(loader, start_lr=params.start_lr, end_lr=params.end_lr, num_iter=params.num_iter,
                      step_mode=params.step_mode, smooth_f=params.smooth_f, diverge_th=params.diverge_th)
    lrs, losses = list(finder.history["lr"]), list(finder.history["loss"])
    finder.reset()  # the measured model must not leave the range test trained
    return lrs, losses


def _trimmed(lrs: Sequence[float], losses: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    lrs_a, losses_a = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    finite = np.isfinite(losses_a)
    lrs_a, losses_a = lrs_a[finite], losses_a[finite]
    if len(lrs_a) < SKIP_START + SKIP_END + 2:
        raise CifarlabError(
            f"the LR range test recorded {len(lrs_a)} usable points, need at least {SKIP_START + SKIP_END + 2}: "
            f"raise lr_find.num_iter or lr_find.diverge_th, or lower lr_find.start_lr")
    return lrs_a[SKIP_START:-SKIP_END], losses_a[SKIP_START:-SKIP_END]


def steepest(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The LR where the smoothed loss falls fastest (most negative slope per step)."""
    lrs_a, losses_a = _trimmed(lrs, losses)
    return float(lrs_a[np.gradient(losses_a).argmin()])


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's `valley`: two thirds down the longest decreasing stretch of the loss curve."""
    lrs_a, losses_a = _trimmed(lrs, losses)
    n = len(losses_a)
    longest = [1] * n
    best_start, best_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses_a[i] < losses_a[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[best_end] < longest[i]:
            best_end, best_start = i, i - longest[i]
    third = (best_end - best_start) / 3
    return float(lrs_a[best_start + int(third) + int(third / 2)])


def min_div_10(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """A tenth of the LR at the loss minimum (the minimum itself is already too high)."""
    lrs_a, losses_a = _trimmed(lrs, losses)
    return float(lrs_a[losses_a.argmin()] / 10.0)


def suggestions(lrs: Sequence[float], losses: Sequence[float]) -> dict[str, float]:
    """Every rule's suggested max LR, plus the raw minimum for reference (never used)."""
    rules = {"steepest": steepest, "valley": valley, "min_div_10": min_div_10}
    return {name: rule(lrs, losses) for name, rule in rules.items()}


def loss_minimum_lr(lrs: Sequence[float], losses: Sequence[float]) -> float:
    lrs_a, losses_a = _trimmed(lrs, losses)
    return float(lrs_a[losses_a.argmin()])
