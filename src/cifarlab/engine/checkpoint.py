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

from cifarlab.atomic import atomic_path, write_bytes
from cifarlab.engine.classifier import Classifier
from cifarlab.errors import CifarlabError


def save_checkpoint(path: str | Path, model: Classifier, **info: Any) -> None:
    """Equal weights and info give equal bytes: `torch.save` to a file writes that file's name
    (here the random temporary name) into the archive, so it saves to a buffer, whose archive name
    is fixed, and the bytes are written atomically. DVC then sees the same model as the same file."""
    state = {"arch": model.arch, "state_dict": model.state_dict(), **info}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Rebuild the model a checkpoint describes; a missing, truncated or mismatched file is a CifarlabError."""
    path = Path(path)
    if not path.exists():
        raise CifarlabError(f"checkpoint {path} does not exist; run `dvc repro train`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
        arch, weights = state["arch"], state["state_dict"]
    except Exception as err:  # torch raises many types for a damaged file
        first = str(err).splitlines()[0].split(". ")[0]   # torch's first sentence; the rest is boilerplate
        raise CifarlabError(f"checkpoint {path} is unreadable (truncated or not a checkpoint): {first[:200]}") from None
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
    rename) while the next epoch trains, and without the zip CRC-32 of every record, which cost most
    of a synchronous save (measured: docs/measurements.md); a file that does not load is not resumed
    anyway (`cifarlab.engine.resume.load_resume_state`).

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
            with atomic_path(path) as tmp, _without_crc32():
                torch.save(snapshot, tmp)
        except Exception as err:  # reported by the next wait(), in the training thread
            self._error = f"cannot write the training state {path}: {' '.join(str(err).split())[:200]}"
        self.seconds.append(time.perf_counter() - started)


def _copy_into(buffer: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`buffer.copy_(value)`; between CPU tensors that each fill their own storage, a plain memcpy of
    the bytes (numpy): torch's copy_ runs each tensor as a parallel region, ten times slower than the
    memcpy on a 2-core machine (measured: docs/measurements.md)."""
    source, target = _own_bytes(value), _own_bytes(buffer)
    if source is None or target is None or source.shape != target.shape:
        return buffer.copy_(value)
    np.copyto(target, source)
    return buffer


def _own_bytes(tensor: torch.Tensor) -> Optional[np.ndarray]:
    """The bytes of a CPU tensor that fills exactly its own storage (any dense layout), or None."""
    if tensor.device.type != "cpu" or tensor.storage_offset() != 0 or tensor.numel() == 0 \
            or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() \
            or not (tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last)):
        return None
    return torch.as_strided(tensor, (tensor.numel(),), (1,)).view(torch.uint8).numpy()


def _without_crc32():
    try:
        from torch.utils.serialization import config
        config.save.compute_crc32   # noqa: B018 - raises AttributeError where the setting does not exist
        return config.patch({"save.compute_crc32": False})
    except (ImportError, AttributeError):   # an older torch: always with CRCs
        return contextlib.nullcontext()
