"""Where each training epoch's wall time goes, by phase: train_speed.json's `epoch_phases` and their means."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

PHASES = ("seconds", "steps", "data_wait", "first_batch", "test_pass", "state_save", "other", "overhead")


class EpochTimer:
    """One epoch's record of phase times, from its start (the timer's creation) to `close`.

    `steps` is the training pass less its waits for batches (`data_wait`, of which `first_batch` is
    the loader's start); `test_pass` and `state_save` are timed by `timing`; `close` adds the whole
    and what is left. A phase not reached (the run stopped first) stays None.
    """

    def __init__(self, epoch: int):
        self.started = time.perf_counter()
        self.phase: dict = {"epoch": epoch, **dict.fromkeys(PHASES)}

    def trained(self, result: dict) -> float:
        """The training pass is over (`result`: `train_one_epoch`'s): its seconds, its phases recorded."""
        seconds = time.perf_counter() - self.started
        self.phase.update(steps=seconds - result["data_wait_seconds"], data_wait=result["data_wait_seconds"],
                          first_batch=result["first_batch_seconds"])
        return seconds

    @contextlib.contextmanager
    def timing(self, name: str) -> Iterator[None]:
        """Time the block as phase `name`."""
        started = time.perf_counter()
        yield
        self.phase[name] = time.perf_counter() - started

    def close(self) -> None:
        """Complete the record: `seconds` is the epoch's whole wall time (training to the log line),
        `overhead` everything but the training steps and the test pass, `other` what no phase names
        (progress bar, gathering RNG states, dvclive logging, the log line)."""
        phase = self.phase
        phase["seconds"] = time.perf_counter() - self.started
        phase["overhead"] = phase["seconds"] - phase["steps"] - phase["test_pass"]
        phase["other"] = phase["overhead"] - phase["data_wait"] - phase["state_save"]


def phase_summary(phases: list[dict]) -> dict:
    """train_speed.json's per-epoch phase times and their means over the epochs measured whole (an
    epoch saved just before an interruption has no save time or total: null)."""
    complete = [p for p in phases if p.get("seconds") is not None]
    means = {f"{name}_seconds_mean": sum(p[name] for p in complete) / len(complete)
             for name in PHASES if complete}
    return {"epoch_phases": phases, "epoch_phase_means": means}
