"""Where and how the numbers are computed: device, precision and memory format, worker count and
threads (a training stage's share of the machine: `cifarlab.engine.slots`), seeding and the RNG
state a resumed run restores, and the host-to-device copy (overlapped with compute on CUDA)."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from cifarlab.config.params import RuntimeParams
from cifarlab.errors import CifarlabError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str               # fp32 | bf16 | fp16: the autocast dtype of forward passes
    channels_last: bool
    num_workers: int
    compile: bool = False        # torch.compile the training step (runtime.compile)
    slot: Any = None             # the `slots.Slot` a training stage holds (None: evaluate, tools, torchrun)

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
        """The settings (the run fingerprint covers them, less threads and workers): the device's type,
        not its index, so a run resumes on whichever GPU its slot is; `placement` says which."""
        return {"device": self.device.type, "precision": self.precision,
                "channels_last": self.channels_last, "num_workers": self.num_workers,
                "compile": self.compile, "threads": torch.get_num_threads()}

    def placement(self) -> dict:
        """Which share of the machine the run trained on, and why (metrics/train_speed.json's `slot`)."""
        if self.slot is None:
            return {"label": f"{self.device}, no slot (not a stage's own process, or started by torchrun)"}
        return self.slot.record()


def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX-512 BF16 / AMX); elsewhere bf16 is slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def device_request(value: str) -> tuple[str, Optional[int]]:
    """runtime.device as (auto | cpu | cuda, the index of `cuda:N` or None)."""
    kind, _, index = value.partition(":")
    return kind, int(index) if index else None


def select_runtime(params: RuntimeParams, slot: Any = None, processes: int = 1) -> Runtime:
    """The runtime params resolved for this machine; on a training stage's `slot` (`slots.claim_for`):
    its GPU, or its threads and loader workers on a CPU. `processes` > 1: a DDP launcher's runtime."""
    kind, index = device_request(params.device)
    if kind == "cuda" and not torch.cuda.is_available():
        raise CifarlabError(f"runtime.device is {params.device} but no CUDA device is available; use auto or cpu")
    cuda = kind == "cuda" or (kind == "auto" and torch.cuda.is_available())
    device = torch.device("cpu")
    if cuda:
        index = slot.indices[0] if slot is not None and slot.kind == "cuda" else index
        device = torch.device("cuda", index) if index is not None else torch.device("cuda")
        if index is not None and processes == 1:
            torch.cuda.set_device(index)     # what names no device (synchronize, the scaler) means this one
    precision = params.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_supports_bf16() else "fp32"
    if device.type == "cpu" and precision == "fp16":
        raise CifarlabError("runtime.precision fp16 needs a CUDA device; use auto, bf16 or fp32 on CPU")
    channels_last = precision != "fp32" if params.channels_last == "auto" else params.channels_last
    if slot is not None and slot.kind == "cpu":
        num_workers = slot.num_workers          # its share of the cores: workers and threads counted together
        torch.set_num_threads(slot.threads)
    elif params.num_workers == "auto":
        # On CPU one worker prepares the next batch while the model trains, which hides most of the
        # data wait (bench/throughput.py; docs/measurements.md); more workers would take cores from
        # the training threads. On CUDA the CPU is otherwise idle: up to 8 workers.
        cores = os.cpu_count() or 1
        num_workers = (1 if cores > 1 else 0) if device.type == "cpu" else min(8, cores)
    else:
        num_workers = params.num_workers
    if params.threads != "auto" and not (slot is not None and slot.kind == "cpu"):
        torch.set_num_threads(params.threads)
    return Runtime(device, precision, channels_last, num_workers, params.compile, slot)


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


def to_device(images: torch.Tensor, labels: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    non_blocking = runtime.device.type == "cuda"
    images = images.to(runtime.device, non_blocking=non_blocking)
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(runtime.device, non_blocking=non_blocking)


def device_batches(batches: Iterable, runtime: Runtime) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`batches` on the runtime's device, in its memory format.

    On CUDA each batch is copied on a side stream when the loop asks for it, that is once the previous
    step is queued and typically while the device still runs it: from the loader's pinned memory the
    copy (and the channels_last conversion) overlaps compute, and the compute stream waits for the
    copy on the device, not the host. Batches already on the device are only put in the memory
    format. Elsewhere each batch is simply moved (`to_device`).
    """
    if runtime.device.type != "cuda":
        for images, labels in batches:
            yield to_device(images, labels, runtime)
        return
    copy_stream = torch.cuda.Stream(runtime.device)
    compute = torch.cuda.current_stream(runtime.device)
    for images, labels in batches:
        if images.device.type == "cuda":      # already there (a split held on the device)
            yield to_device(images, labels, runtime)
            continue
        with torch.cuda.stream(copy_stream):
            images, labels = to_device(images, labels, runtime)
        compute.wait_stream(copy_stream)      # a device-side wait: the host goes on queueing work
        images.record_stream(compute)         # used on the compute stream: not reused before it is done
        labels.record_stream(compute)
        yield images, labels
