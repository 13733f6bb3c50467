"""Torch files sealed with a digest of their content, and read back checked.

torch does not check a file it loads: a model or training state with a few bytes changed on disk
(a flipped bit, a bad copy) loads without complaint, and the zip CRC-32s it writes are never read
back (the resume state skips them for speed). So every torch file the pipeline writes is a mapping
sealed with `DIGEST_KEY`: a sha256 over its content (`content_digest`), and `load` checks it. A
missing, empty, truncated or garbage file, or one whose content does not match its digest, is one
line (`DamagedFile`) naming the file. torch is imported when needed, not with this module.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from cifarlab.errors import CifarlabError

if TYPE_CHECKING:
    import numpy as np

DIGEST_KEY = "content_sha256"
_SCALARS = (int, float, str, bool, bytes, type(None))


class DamagedFile(CifarlabError):
    """A torch file that cannot be read, or whose content is not what was saved."""


def content_digest(value: Any) -> str:
    """sha256 over `value` walked in order: the raw bytes of every tensor and numpy array (with its
    dtype, shape and strides), every key and every other value, leaving out a top-level `DIGEST_KEY`.

    What `torch.save` wrote and `torch.load` read back gives the same digest: dict order, dtypes,
    memory layouts and values all survive the round trip. The tensors' bytes are hashed in place
    (no copy when a tensor fills its own storage), and hashlib releases the GIL while it hashes them,
    so a background writer does not hold up the thread that trains."""
    digest = hashlib.sha256()
    if isinstance(value, dict):
        value = {key: item for key, item in value.items() if key != DIGEST_KEY}
    _update(digest, value)
    return digest.hexdigest()


def sealed(state: dict) -> dict:
    """`state` with its content digest added under `DIGEST_KEY`."""
    return {**state, DIGEST_KEY: content_digest(state)}


def load(path: str | Path, what: str, require_digest: bool = True, map_location: Any = "cpu") -> dict:
    """The mapping a torch file holds, checked against its digest. `what` names the file in the
    message ("checkpoint", "saved state"). Without `require_digest`, a file with no digest at all
    (written before files were sealed) loads unchecked; one with a digest is always checked."""
    import torch

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise DamagedFile(f"{what} {path} cannot be read: {err.strerror or err}") from None
    if size == 0:
        raise DamagedFile(f"{what} {path} is empty (0 bytes)")
    try:
        saved = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many types (RuntimeError, UnpicklingError, EOFError...) for a damaged file
        lines = str(err).strip().splitlines()
        first = (lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__)[:200]   # then boilerplate
        raise DamagedFile(f"{what} {path} is unreadable (truncated or not a {what}): {first}") from None
    if not isinstance(saved, dict):
        raise DamagedFile(f"{what} {path} is not a {what}: it holds a {type(saved).__name__}, not a mapping")
    recorded = saved.get(DIGEST_KEY)
    if recorded is None:
        if require_digest:
            raise DamagedFile(f"{what} {path} has no content digest (damaged, or not written by this version)")
        return saved
    if recorded != content_digest(saved):
        raise DamagedFile(f"{what} {path} is damaged: its content does not match the digest saved with it "
                          f"(bytes changed on disk)")
    return saved


def _update(digest, value: Any) -> None:
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        layout, raw = _tensor_bytes(value.detach())
        digest.update(repr(("tensor", str(value.dtype), tuple(value.shape), layout)).encode())
        digest.update(raw)
    elif isinstance(value, np.ndarray):
        digest.update(repr(("ndarray", value.dtype.str, value.shape)).encode())
        digest.update(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}\0".encode())
        for key, item in value.items():
            _update(digest, key)
            _update(digest, item)
    elif isinstance(value, (list, tuple)) and all(type(item) in _SCALARS for item in value):
        digest.update(f"{type(value).__name__} scalars\0".encode() + repr(value).encode() + b"\0")   # one update
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)}\0".encode())
        for item in value:
            _update(digest, item)
    elif type(value) in _SCALARS:
        digest.update(f"{type(value).__name__} {value!r}\0".encode())
    else:   # anything else a state may hold (a torch.dtype, a numpy scalar): as pickle writes it
        digest.update(b"pickle\0" + pickle.dumps(value, protocol=4) + b"\0")


def _tensor_bytes(tensor) -> tuple[tuple, Any]:
    """(how the bytes are laid out, the bytes) of a tensor, the same on any device and after a
    save/load round trip: a tensor that fills its own storage is hashed as stored, in place on the
    CPU; a view into a larger storage (shared weights) as its values, in order."""
    if tensor.numel() == 0:
        return ("empty",), b""
    if _fills_storage(tensor):
        on_cpu = tensor if tensor.device.type == "cpu" else tensor.cpu()   # .cpu() keeps a dense layout
        return ("storage", tuple(tensor.stride())), own_bytes(on_cpu).data
    return ("values",), own_bytes(tensor.cpu().contiguous().clone()).data


def _fills_storage(tensor) -> bool:
    import torch

    return (tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
            and (tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last)))


def own_bytes(tensor) -> Optional["np.ndarray"]:
    """The bytes of a CPU tensor that fills exactly its own storage (any dense layout), as a uint8
    array sharing its memory; None for any other tensor (on another device, a view, empty)."""
    import torch

    if tensor.device.type != "cpu" or tensor.numel() == 0 or not _fills_storage(tensor):
        return None
    return torch.as_strided(tensor, (tensor.numel(),), (1,)).view(torch.uint8).numpy()
