"""Self-describing checkpoints: weights plus architecture, epoch and the resolved params; and the
background writer of the train stage's per-epoch resume state."""

from __future__ import annotations

import contextlib
import copy
import io
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from cifarlab import torchfile
from cifarlab.atomic import atomic_path, write_bytes
from cifarlab.engine.classifier import Classifier
from cifarlab.errors import CifarlabError


def save_checkpoint(path: str | Path, model: Classifier, **info: Any) -> None:
    """Equal weights and info give equal bytes: `torch.save` to a file writes that file's name
    (here the random temporary name) into the archive, so it saves to a buffer, whose archive name
    is fixed, and the bytes are written atomically. DVC then sees the same model as the same file.
    The file is sealed with its content digest (`cifarlab.torchfile`), a function of the weights and
    info, so equal models still give equal bytes."""
    state = torchfile.sealed({"arch": model.arch, "state_dict": model.state_dict(), **info})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Rebuild the model a checkpoint describes. A missing, empty, truncated, garbage or changed file,
    or weights of another model, is a one-line CifarlabError naming the file. A checkpoint written
    before checkpoints were sealed (no digest) loads unchecked."""
    path = Path(path)
    if not path.exists():
        raise CifarlabError(f"checkpoint {path} does not exist; run `dvc repro train`")
    restore = "; `dvc repro train` restores it (from DVC's run-cache, or by training again)"
    try:
        state = torchfile.load(path, "checkpoint", require_digest=False, map_location=map_location)
        arch, weights = state["arch"], state["state_dict"]
    except torchfile.DamagedFile as err:
        raise CifarlabError(f"{err}{restore}") from None
    except KeyError as err:
        raise CifarlabError(f"checkpoint {path} is not a model checkpoint: it has no `{err.args[0]}`{restore}") from None
    try:
        model = Classifier(arch, dropout=state.get("dropout", 0.0), num_classes=state.get("num_classes", 10))
    except KeyError as err:
        raise CifarlabError(f"checkpoint {path} names {err.args[0]}") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]   # lines[0] is only "Error(s) in loading state_dict ..."
        raise CifarlabError(f"checkpoint {path} does not fit architecture `{arch}` (weights of another model?): "
                            f"{detail[:200]}") from None
    return model, state


class StateWriter:
    """Writes the train stage's resume state after every epoch without holding up training.

    `save(path, state)` copies the state's tensors into host buffers kept from one save to the next
    (on CUDA the device-to-host copy; on a CPU a memcpy into memory already mapped): that copy is
    all the training loop waits for. A thread then writes the file atomically (temporary name, then
    rename) while the next epoch trains, sealed with the sha256 of its content (`cifarlab.torchfile`)
    and without the zip CRC-32 of every record, which cost most of a synchronous save (measured:
    docs/measurements.md) and which torch never reads back: the digest is what
    `cifarlab.engine.resume.load_resume_state` checks, and a file that fails it is not resumed. The
    file goes through a Python file object, so a full disk is an OSError (ENOSPC), which
    `cifarlab.atomic` reports in one line, not torch's internal message.

    One write at a time: `save` first waits for the previous write. `wait()` waits for the last one
    and raises if it failed; the trainer calls it before it reports a state as saved (interruption,
    divergence) and before it deletes the state of a completed run. `seconds` lists each write's
    duration, in the background.
    """

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[str] = None
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.seconds: list[float] = []

    def save(self, path: Path, state: dict) -> None:
        self.wait()
        snapshot = self._snapshot(state, ())
        # Not a daemon: if the stage fails for another reason, the interpreter finishes this write before it exits.
        self._thread = threading.Thread(target=self._write, args=(Path(path), snapshot), name="state-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CifarlabError(error)

    def _snapshot(self, value: Any, key: tuple) -> Any:
        """`value` with every tensor copied into this writer's buffer for its place in the state."""
        if isinstance(value, torch.Tensor):
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype \
                    or buffer.stride() != value.stride():
                buffer = self._buffers[key] = torch.empty_like(value, device="cpu")
            return _copy_into(buffer, value.detach())
        if isinstance(value, dict):
            return {k: self._snapshot(v, key + (k,)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            if all(isinstance(v, (int, float, str, bool, type(None))) for v in value):
                return copy.copy(value)   # immutable items (a log of LRs): a shallow copy is a copy
            items = [self._snapshot(v, key + (i,)) for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        return copy.deepcopy(value)

    def _write(self, path: Path, snapshot: dict) -> None:
        started = time.perf_counter()
        try:
            state = torchfile.sealed(snapshot)
            with atomic_path(path, size=_nbytes(state), what="the training state ") as tmp, _without_crc32(), \
                    open(tmp, "wb") as handle:
                torch.save(state, handle)
        except CifarlabError as err:   # the disk is full: reported by the next wait(), in the training thread
            self._error = str(err)
        except Exception as err:
            self._error = f"cannot write the training state {path}: {' '.join(str(err).split())[:200]}"
        self.seconds.append(time.perf_counter() - started)


def _nbytes(value: Any) -> int:
    """About the size of `value` saved: its tensors' bytes (the rest is small)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _copy_into(buffer: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`buffer.copy_(value)`; between CPU tensors that each fill their own storage, a plain memcpy of
    the bytes (numpy): torch's copy_ runs each tensor as a parallel region, ten times slower than the
    memcpy on a 2-core machine (measured: docs/measurements.md)."""
    source, target = torchfile.own_bytes(value), torchfile.own_bytes(buffer)
    if source is None or target is None or source.shape != target.shape:
        return buffer.copy_(value)
    np.copyto(target, source)
    return buffer


def _without_crc32():
    try:
        from torch.utils.serialization import config
        config.save.compute_crc32   # noqa: B018 - raises AttributeError where the setting does not exist
        return config.patch({"save.compute_crc32": False})
    except (ImportError, AttributeError):   # an older torch: always with CRCs
        return contextlib.nullcontext()
