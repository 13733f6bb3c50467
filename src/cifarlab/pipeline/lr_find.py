"""The lr_find stage (`lr_find`): the LR range test (torch-lr-finder), stopped once the loss has
clearly turned up, when something uses it; otherwise a no-op.

The range test runs when `train.max_lr` is `find` (the max_lr stage takes its suggestion) or when
`lr_find.when` is `always` (for the report's figure). With a number and `lr_find.when: find` nothing
reads its answer, so the stage trains nothing and imports no torch: it writes `NOT_RUN` and
`NOT_RUN_CURVE`, the same bytes whatever the number, so a new number reruns nothing after it.

The rules that read its curve live in `cifarlab.config.lr_rules`; the raw loss minimum is never a
suggestion (the seeds' assignment 8 trained at it and diverged).
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Sequence

import numpy as np

from cifarlab import paths
from cifarlab.atomic import atomic_path, write_json
from cifarlab.config.lr_rules import suggestions, window
from cifarlab.config.params import FIND, LrFindParams, Params

if TYPE_CHECKING:
    import torch

    from cifarlab.engine.runtime import Runtime

# What a range test that was not run writes: nothing in either depends on the number in train.max_lr.
NOT_RUN = {"ran": False, "why": "train.max_lr is a number and lr_find.when is `find`: nothing uses the range test"}
# One row with no LR and no loss, only a note: `dvc plots` draws an empty plot that says so (its template,
# .dvc/plots/lr_range_log.json, writes the note), where a header alone would leave it nothing to draw.
NOT_RUN_NOTE = "range test not run: train.max_lr is a number (lr_find.when: always runs it)"
NOT_RUN_CURVE = f"lr,loss,note\n,,{NOT_RUN_NOTE}\n"


def wanted(params: Params) -> bool:
    """Does anything use the range test? `train.max_lr: find` does; `lr_find.when: always` asks for it."""
    return params.train.max_lr == FIND or params.lr_find.when == "always"


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


def _stopping_finder(*args, rebound: float, **kwargs):
    """torch-lr-finder's range test, stopped by `turned_up` before each further batch."""
    from torch_lr_finder import LRFinder

    class StoppingFinder(LRFinder):
        def _train_batch(self, *batch_args, **batch_kwargs):
            if turned_up(self.history["loss"], rebound):
                raise _TurnedUp
            return super()._train_batch(*batch_args, **batch_kwargs)

    return StoppingFinder(*args, **kwargs)


def range_test(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader, runtime: Runtime,
               params: LrFindParams, label_smoothing: float = 0.0) -> tuple[list[float], list[float]]:
    """Run the range test and return (lrs, smoothed losses). The model is restored afterwards."""
    import torch
    from torch_lr_finder.lr_finder import TrainDataLoaderIter

    criterion = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    amp = {}
    if runtime.autocast_dtype is not None:
        amp = {"amp_backend": "torch",
               "amp_config": {"device_type": runtime.device.type, "dtype": runtime.autocast_dtype},
               "grad_scaler": torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler())}
    if not isinstance(loader, torch.utils.data.DataLoader):
        loader = TrainDataLoaderIter(loader)   # the batch path's epoch (loaders.DeviceBatchLoader)
    finder = _stopping_finder(model, optimizer, criterion, device=runtime.device, rebound=params.stop_rebound, **amp)
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


def lr_find(params: Params) -> dict:
    """The lr_find stage: the range test (`find_max_lr`) when something uses it (`wanted`), else the
    no-op outputs; returns what metrics/lr_find.json holds."""
    if wanted(params):
        return find_max_lr(params)
    with atomic_path(paths.LR_FIND_CURVE) as tmp:
        tmp.write_text(NOT_RUN_CURVE)
    write_json(paths.LR_FIND_METRICS, NOT_RUN)
    print(f"lr_find: not run, nothing uses it: train.max_lr is {params.train.max_lr:g} and lr_find.when is `find` "
          f"(set lr_find.when: always to run it anyway, or train.max_lr: find to train at its suggestion)")
    return NOT_RUN


def find_max_lr(params: Params) -> dict:
    """The range test with the training model, optimizer, batch size and augmentation; writes the
    curve (plots/lr_find.csv) and metrics/lr_find.json and returns the latter."""
    from cifarlab.data.loaders import train_loader
    from cifarlab.data.subset import load_subset
    from cifarlab.engine.classifier import build_model
    from cifarlab.engine.runtime import seed_everything, select_runtime
    from cifarlab.engine.schedule import build_optimizer
    from cifarlab.engine.slots import claim_for

    runtime = select_runtime(params.runtime, claim_for(params.runtime, "lr_find"))   # it trains: a share (slots)
    dataset = load_subset(paths.DATA_DIR, train=params.data.train_subset)
    seed_everything(params.train.seed)
    loader = train_loader(dataset.train, params.augment, params.train.batch_size,
                          params.train.seed, runtime)
    model = build_model(params.model, runtime, len(dataset.classes), dataset.train.images)
    optimizer = build_optimizer(model, params.optim, lr=params.lr_find.start_lr)
    lrs, losses = range_test(model, optimizer, loader.epoch(0), runtime, params.lr_find,
                             params.optim.label_smoothing)
    found = read_curve(lrs, losses, params.lr_find)
    with atomic_path(paths.LR_FIND_CURVE) as tmp:
        tmp.write_text("lr,loss\n" + "".join(f"{lr!r},{loss!r}\n" for lr, loss in zip(lrs, losses)))
    write_json(paths.LR_FIND_METRICS, found)
    at_end = " (the end of the sweep: the loss still falls there)" if found["minimum_at_end"] else ""
    print(f"lr_find: max_lr {found['max_lr']:.3e} by rule `{found['rule']}` "
          f"({', '.join(f'{k} {v:.2e}' for k, v in found['suggestions'].items())}; loss minimum at "
          f"{found['loss_minimum_lr']:.2e}{at_end}, {len(lrs)} of {params.lr_find.num_iter} iterations)")
    return found


def read_curve(lrs: Sequence[float], losses: Sequence[float], params: LrFindParams) -> dict:
    """What metrics/lr_find.json holds for a range test's curve: every rule's suggestion, `lr_find.rule`'s
    as `max_lr`, the loss minimum and the window the rules read. A curve with no usable descent stops
    here with one line (`lr_rules.CurveError`)."""
    descent = window(lrs, losses)
    candidates = suggestions(descent)
    return {
        "ran": True, "max_lr": candidates[params.rule], "rule": params.rule, "suggestions": candidates,
        "loss_minimum_lr": descent.minimum_lr, "window": list(descent.bounds), "iterations": len(lrs),
        "stopped_early": len(lrs) < params.num_iter,
        # the lowest point is the sweep's last: the loss still falls there, so it is only where the sweep
        # ended (raise lr_find.end_lr to see the turn), not a point where training diverges
        "minimum_at_end": descent.minimum_lr == float(lrs[-1])}
