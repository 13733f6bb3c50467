"""Device and precision selection, one training epoch, and the one `evaluate` used everywhere."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cifarlab.data import EpochLoader, ImageDataset, Normalize, Split
from cifarlab.distributed import all_reduce_sum, any_process
from cifarlab.errors import CifarlabError
from cifarlab.models import create_model, model_spec
from cifarlab.params import ModelParams, RuntimeParams

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str               # fp32 | bf16 | fp16: the autocast dtype of forward passes
    channels_last: bool
    num_workers: int
    compile: bool = False        # torch.compile the training step (runtime.compile)

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return _DTYPES[self.precision]

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def needs_grad_scaler(self) -> bool:
        return self.device.type == "cuda" and self.precision == "fp16"

    def describe(self) -> dict:
        return {"device": str(self.device), "precision": self.precision,
                "channels_last": self.channels_last, "num_workers": self.num_workers,
                "compile": self.compile, "threads": torch.get_num_threads()}


def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX-512 BF16 / AMX); elsewhere bf16 is slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def select_runtime(params: RuntimeParams) -> Runtime:
    if params.device == "cuda" and not torch.cuda.is_available():
        raise CifarlabError("runtime.device is cuda but no CUDA device is available; use auto or cpu")
    device = torch.device("cuda" if params.device == "cuda" or
                          (params.device == "auto" and torch.cuda.is_available()) else "cpu")
    precision = params.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_supports_bf16() else "fp32"
    if device.type == "cpu" and precision == "fp16":
        raise CifarlabError("runtime.precision fp16 needs a CUDA device; use auto, bf16 or fp32 on CPU")
    channels_last = precision != "fp32" if params.channels_last == "auto" else params.channels_last
    if params.num_workers == "auto":
        # On CPU one worker prepares the next batch while the model trains: measured with
        # bench/throughput.py on 2 cores, the data wait fell from 19% to 2% of a step (a7_net,
        # +16% images/s) and from 3% to 0.1% (custom_resnet, +3%); more workers would take cores
        # from the training threads. On CUDA the CPU is otherwise idle: up to 8 workers.
        cores = os.cpu_count() or 1
        num_workers = (1 if cores > 1 else 0) if device.type == "cpu" else min(8, cores)
    else:
        num_workers = params.num_workers
    return Runtime(device, precision, channels_last, num_workers, params.compile)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)


def rng_state() -> dict:
    """Every global RNG a training step can draw from (dropout, init), for exact resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def prepare_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_model(params: ModelParams, runtime: Runtime, num_classes: int) -> Classifier:
    """A fresh model from params, on the runtime's device and memory format."""
    return prepare_model(Classifier(params.name, params.dropout, num_classes), runtime)


def train_loader(split: Split, transform, batch_size: int, seed: int, runtime: Runtime,
                 rank: int = 0, world_size: int = 1) -> EpochLoader:
    """The augmented, shuffled training loader with worker and pinning settings for the device;
    in a distributed run, this process's share of every global batch."""
    if batch_size > len(split):
        raise CifarlabError(f"train.batch_size is {batch_size}; allowed: at most the training split size "
                            f"({len(split)})")
    return EpochLoader(ImageDataset(split, transform), batch_size, seed, runtime.num_workers,
                       pin_memory=runtime.device.type == "cuda", rank=rank, world_size=world_size)


def to_device(images: torch.Tensor, labels: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    non_blocking = runtime.device.type == "cuda"
    images = images.to(runtime.device, non_blocking=non_blocking)
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(runtime.device, non_blocking=non_blocking)


def train_one_epoch(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer, scheduler,
                    runtime: Runtime, label_smoothing: float = 0.0, scaler=None,
                    progress: Optional[tqdm] = None, guard: Optional[DivergenceGuard] = None,
                    lrs: Optional[list[float]] = None) -> dict:
    """One pass over `batches`, stepping the scheduler after every batch.

    Loss and correct counts accumulate on the device: there is no host sync per batch except
    every few batches, where the progress bar reads the running loss and the divergence guard is
    checked. `lrs` is the run's per-batch LR log so far; this epoch's LRs are appended to it.
    """
    model.train()
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    seen = 0
    lrs = [] if lrs is None else lrs
    first_step = scheduler.last_epoch
    steps_per_epoch = len(batches) if hasattr(batches, "__len__") else 0
    for batch_index, (images, labels) in enumerate(batches):
        images, labels = to_device(images, labels, runtime)
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
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        if guard is not None:
            guard.update(loss, step)
        if progress is not None:
            progress.update(1)
        if batch_index % 10 == 9:
            if guard is not None:
                guard.check(lrs, steps_per_epoch)
            if progress is not None:
                progress.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{lrs[-1]:.2e}")
    if guard is not None:
        guard.check(lrs, steps_per_epoch)
    loss_total, correct_total, seen_total = all_reduce_sum([loss_sum.item(), correct.item(), seen], runtime.device)
    return {"loss": loss_total / seen_total, "accuracy": correct_total / seen_total, "images": int(seen_total),
            "last_lr": lrs[-1]}


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable, runtime: Runtime) -> dict:
    """Mean cross-entropy, accuracy, and per-image predictions of `model` over `batches`."""
    model.eval()
    loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    predictions, confidences, targets = [], [], []
    for images, labels in batches:
        images, labels = to_device(images, labels, runtime)
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
