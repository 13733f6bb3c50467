"""The training and evaluation passes every stage uses, and the divergence guard that watches training."""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cifarlab.engine.distributed import all_reduce_sum, any_process, distributed_run
from cifarlab.engine.runtime import device_batches, Runtime
from cifarlab.errors import CifarlabError


class TrainingDiverged(CifarlabError):
    """The loss became non-finite or exploded; the message names epoch, step and LR."""


class DivergenceGuard:
    """Watches the batch loss on the device: trips on a non-finite loss, or when the smoothed loss
    exceeds `factor` times its best so far. Reading the verdict (`check`) is the only host sync."""

    SMOOTHING = 0.9

    def __init__(self, factor: float, device: torch.device, advice: str = "lower train.max_lr"):
        self.factor = factor
        self.advice = advice   # what to change, which depends on how the max LR was chosen
        self.ema = torch.full((), float("nan"), device=device)
        self.best = torch.full((), float("inf"), device=device)
        self.tripped = torch.zeros((), dtype=torch.bool, device=device)
        self.trip_step = torch.full((), -1, dtype=torch.long, device=device)
        self.trip_loss = torch.zeros((), device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        first = torch.isnan(self.ema)
        self.ema = torch.where(first, loss, self.SMOOTHING * self.ema + (1 - self.SMOOTHING) * loss)
        bad = ~torch.isfinite(loss) | (self.ema > self.factor * self.best)
        self.best = torch.minimum(self.best, self.ema)
        newly = bad & ~self.tripped
        self.trip_step = torch.where(newly, torch.full_like(self.trip_step, step), self.trip_step)
        self.trip_loss = torch.where(newly, loss, self.trip_loss)
        self.tripped = self.tripped | bad

    def check(self, lrs_by_step: list[float], steps_per_epoch: int) -> None:
        """Raise TrainingDiverged if the guard tripped here or in any other process."""
        if not any_process(self.tripped):
            return
        step = int(self.trip_step)
        loss = float(self.trip_loss)
        why = (f"loss {loss:.4g} is not finite" if not np.isfinite(loss) else
               f"smoothed loss exceeded {self.factor:g} x its best ({float(self.best):.4g})")
        raise TrainingDiverged(
            f"training diverged at epoch {step // steps_per_epoch + 1}, step {step} (lr {lrs_by_step[step]:.3g}): "
            f"{why}; {self.advice}")

    def state_dict(self) -> dict:
        return {name: getattr(self, name).cpu() for name in ("ema", "best", "tripped", "trip_step", "trip_loss")}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value.to(self.tripped.device))


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, scheduler,
                    runtime: Runtime, label_smoothing: float = 0.0, scaler=None,
                    progress: Optional[tqdm] = None, guard: Optional[DivergenceGuard] = None,
                    lrs: Optional[list[float]] = None, after_step: Optional[Callable[[int], None]] = None) -> dict:
    """One pass over `batches`, stepping the scheduler after every batch.

    Loss and correct counts accumulate on the device. Every 10 batches the progress bar shows the
    running loss and the divergence guard is checked; on CUDA both read values copied to the host
    without waiting (`DeviceReadout`: the newest the device has finished), so the host never stalls
    the device within an epoch, and a divergence is reported at most a few checks later, naming the
    step where it happened. A distributed run checks the guard with a collective every 10 batches.
    Batches reach the device through `device_batches` (on CUDA, copied while the previous step
    runs). `lrs` is the run's per-batch LR log so far; this epoch's LRs are appended to it.
    `after_step(n)` runs after the n-th optimizer step of the run (e.g. lookahead). The result also
    says how long the pass waited for its batches (`data_wait_seconds`, of which `first_batch_seconds`
    for the first: the loader's start).
    """
    model.train()
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    seen = 0
    lrs = [] if lrs is None else lrs
    first_step = scheduler.last_epoch
    steps_per_epoch = len(batches) if hasattr(batches, "__len__") else 0
    waits = WaitClock(batches)
    readout = DeviceReadout(runtime.device)
    collective = guard is not None and distributed_run()
    for batch_index, (images, labels) in enumerate(device_batches(waits, runtime)):
        step = first_step + batch_index
        lrs.append(optimizer.param_groups[0]["lr"])
        with runtime.autocast():
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler.last_epoch < scheduler.total_steps - 1:
            # Stepping past the last batch would ask OneCycleLR for an LR beyond its cycle
            # (a division by zero when the peak is at the very end).
            scheduler.step()
        if after_step is not None:
            after_step(step + 1)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        if guard is not None:
            guard.update(loss, step)
        if progress is not None:
            progress.update(1)
        if batch_index % 10 == 9:
            if collective:
                guard.check(lrs, steps_per_epoch)      # every process must take part, at the same step
            readout.post((loss_sum, guard.tripped if guard is not None else correct), seen)
            latest = readout.latest()
            if latest is not None:
                (running_loss, tripped), seen_then = latest
                if guard is not None and not collective and bool(tripped):
                    guard.check(lrs, steps_per_epoch)  # raises, with the step it tripped at
                if progress is not None:
                    progress.set_postfix(loss=f"{float(running_loss) / seen_then:.4f}", lr=f"{lrs[-1]:.2e}")
    if guard is not None:
        guard.check(lrs, steps_per_epoch)
    loss_total, correct_total, seen_total = all_reduce_sum([loss_sum.item(), correct.item(), seen], runtime.device)
    return {"loss": loss_total / seen_total, "accuracy": correct_total / seen_total, "images": int(seen_total),
            "last_lr": lrs[-1], "data_wait_seconds": waits.seconds, "first_batch_seconds": waits.first}


class WaitClock:
    """Iterates `batches`, adding up the seconds spent waiting for each (`seconds`; `first`: the first)."""

    def __init__(self, batches: Iterable):
        self.batches = batches
        self.seconds = self.first = 0.0

    def __iter__(self):
        iterator = iter(self.batches)
        count = 0
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            waited = time.perf_counter() - started
            self.seconds += waited
            if count == 0:
                self.first = waited
            count += 1
            yield batch


class DeviceReadout:
    """Small device tensors read on the host without stalling the device.

    `post(tensors, note)` queues copies of `tensors` behind the work already queued (on CUDA, into
    pinned host memory, non-blocking, with an event); `latest()` returns (host copies, note) of the
    newest post the device has finished, or None before any. On a CPU the copy is made at once, so
    `latest()` is always the post just made.
    """

    def __init__(self, device: torch.device):
        self.asynchronous = device.type == "cuda"
        self._pending: deque = deque()
        self._latest = None

    def post(self, tensors: tuple[torch.Tensor, ...], note=None) -> None:
        if not self.asynchronous:
            self._latest = (tuple(t.detach().clone() for t in tensors), note)
            return
        copies = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t.detach(), non_blocking=True)
                       for t in tensors)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, (copies, note)))

    def latest(self):
        while self._pending and self._pending[0][0].query():
            self._latest = self._pending.popleft()[1]
        return self._latest


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable, runtime: Runtime) -> dict:
    """Mean cross-entropy, accuracy, and per-image predictions of `model` over `batches`."""
    model.eval()
    loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    predictions, confidences, targets = [], [], []
    for images, labels in device_batches(batches, runtime):
        with runtime.autocast():
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        probabilities = logits.softmax(1)
        confidence, predicted = probabilities.max(1)
        predictions.append(predicted)
        confidences.append(confidence)
        targets.append(labels)
    predicted = torch.cat(predictions).cpu()
    target = torch.cat(targets).cpu()
    count = len(target)
    if count == 0:
        raise CifarlabError("evaluate got no images")
    return {"loss": loss_sum.item() / count, "accuracy": (predicted == target).double().mean().item(),
            "count": count, "predicted": predicted, "target": target,
            "confidence": torch.cat(confidences).cpu()}
