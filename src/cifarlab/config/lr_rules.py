"""Rules that turn an LR range test's curve into a max LR, and the window they may look at.

Numpy only (no torch): `params` imports the rule names and the minimum number of iterations from here, and
`lr_finder` runs the range test whose curve these rules read.

What real CIFAR-10 curves taught (the measurements are in docs/measurements.md; the rules'
story in docs/lr-finder.md):
- Past the smoothed loss minimum the curve says nothing useful. After divergence a network
  saturates and its loss drifts back down toward ln 10, so a rule that looks there (the old
  `steepest`) picked an LR far above the minimum for assignment 8, and training diverged.
  So every rule sees only the *window* from the trimmed start up to (not including) the minimum,
  and every answer is strictly below the loss-minimum LR, checked.
- Inside the window the steepest slope sits on the early descent, where the loss falls fast
  because the network is untrained, not because the LR is good: on the default preset's real
  curve it lay far below the known-good LR, and session 11 trained at such a pick to well below its
  target. The range test conflates the LR with training progress.
  `min_div_10` (a tenth of the loss-minimum LR, fastai's `lr_min` rule) depends only on where
  the curve turns, which is what the LR decides: it is the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from cifarlab.errors import CifarlabError

SKIP_START = 10   # points trimmed from the start: the smoothing has not settled there
MIN_WINDOW = 5    # points a rule needs between the trimmed start and the loss minimum
MIN_NUM_ITER = SKIP_START + MIN_WINDOW + 1   # lr_find.num_iter's floor, checked when params load
DEFAULT_RULE = "min_div_10"


class CurveError(CifarlabError):
    """The range test's curve has no usable descending window (one line saying what to change)."""


@dataclass(frozen=True)
class Window:
    """The part of the curve the rules read: LRs and smoothed losses from the trimmed start up to,
    not including, the smoothed-loss minimum."""

    lrs: np.ndarray
    losses: np.ndarray
    minimum_lr: float      # LR of the smoothed-loss minimum (never a suggestion)
    minimum_loss: float

    @property
    def bounds(self) -> tuple[float, float]:
        return float(self.lrs[0]), self.minimum_lr


def window(lrs: Sequence[float], losses: Sequence[float]) -> Window:
    """Cut the curve to its descending window; raise CurveError when too little of it is usable."""
    lrs_a, losses_a = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if lrs_a.shape != losses_a.shape:
        raise CurveError(f"the range test recorded {len(lrs_a)} LRs but {len(losses_a)} losses")
    bad = np.flatnonzero(~np.isfinite(losses_a))
    usable = int(bad[0]) if len(bad) else len(losses_a)   # nothing after the first nan/inf counts
    lrs_a, losses_a = lrs_a[SKIP_START:usable], losses_a[SKIP_START:usable]
    if len(losses_a) < MIN_WINDOW + 1:
        raise CurveError(
            f"the LR range test has {max(len(losses_a), 0)} usable points after the first {SKIP_START}, "
            f"need at least {MIN_WINDOW + 1}: raise lr_find.num_iter or lower lr_find.start_lr")
    lowest = int(np.argmin(losses_a))
    if lowest < MIN_WINDOW:
        raise CurveError(
            f"the LR range test's loss was lowest at {lrs_a[lowest]:.3g}, {lowest} points after the trimmed start "
            f"(need {MIN_WINDOW} below the minimum): raise lr_find.num_iter or lower lr_find.start_lr, so the "
            f"curve has a descent to read")
    return Window(lrs_a[:lowest], losses_a[:lowest], float(lrs_a[lowest]), float(losses_a[lowest]))


def steepest(w: Window) -> float:
    """The LR where the smoothed loss falls fastest (most negative slope per step) in the window."""
    return float(w.lrs[np.gradient(w.losses).argmin()])


def valley(w: Window) -> float:
    """fastai's `valley` on the window: two thirds down its longest decreasing stretch."""
    losses = w.losses
    n = len(losses)
    longest = [1] * n
    best_start, best_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
        if longest[best_end] < longest[i]:
            best_end, best_start = i, i - longest[i] + 1
    third = (best_end - best_start) / 3
    return float(w.lrs[best_start + int(third) + int(third / 2)])


def min_div_10(w: Window) -> float:
    """A tenth of the loss-minimum LR (fastai's `lr_min`), not below the window's first LR."""
    return max(w.minimum_lr / 10.0, float(w.lrs[0]))


RULES: dict[str, Callable[[Window], float]] = {"min_div_10": min_div_10, "steepest": steepest, "valley": valley}


def suggestions(w: Window) -> dict[str, float]:
    """Every rule's answer; each is checked to lie in the window, strictly below the minimum."""
    out = {}
    for name, rule in RULES.items():
        lr = rule(w)
        if not (w.lrs[0] <= lr < w.minimum_lr):
            raise CurveError(f"lr_find rule `{name}` answered {lr:.3g}, outside its window "
                             f"{w.lrs[0]:.3g} .. {w.minimum_lr:.3g} (the loss minimum): this is a bug, please report it")
        out[name] = lr
    return out
