"""Write outputs atomically: to a temporary name beside the target, then rename.

A stage that fails halfway leaves either the previous file or nothing, never a truncated one. A
write that fails for lack of space is one line (`DiskFull`) naming the file, about how much it
needed and how much is free, and leaves no temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from cifarlab.errors import CifarlabError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)     # the disk (or this user's quota) is full
# torch.save to a path writes through its own C++ writer, which reports a failed write in its own
# words (`[enforce fail at inline_container.cc:...] . unexpected pos`, `PytorchStreamWriter failed
# writing file`), not as an OSError.
TORCH_WRITE_FAILED = ("inline_container.cc", "PytorchStreamWriter failed")
LOW_SPACE = 1 << 20     # at most this much free after such a failure: the disk filled up


class DiskFull(CifarlabError):
    """An output could not be written for lack of space."""


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)   # elsewhere reading it means setting it: set it straight back
    os.umask(mask)
    return mask


def _as_created(path: Path, directory: bool = False) -> None:
    """Give a temporary file or directory the mode an ordinary `open`/`mkdir` would have given it.

    `tempfile.mkstemp`/`mkdtemp` create 0600/0700 (private), and the rename keeps that mode: without
    this, a second user or a shared filesystem could not read the results."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(target: str | Path, size: Optional[int] = None, what: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success rename it to `target`.

    A write into it that fails for lack of space (an OSError ENOSPC/EDQUOT, or torch's own message
    for a failed write while the disk has next to nothing free) becomes a `DiskFull` naming `what`
    (e.g. "the training state ") and `target`, with `size` (the bytes being written, where the
    caller knows them; else what was written before it failed) and the space left."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    _as_created(tmp_path)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except (OSError, RuntimeError) as err:
        full = _disk_full(err, target, _size_of(tmp_path), size, what)
        if full is None:
            raise
        raise full from None
    finally:
        tmp_path.unlink(missing_ok=True)


def _disk_full(err: BaseException, target: Path, written: int, size: Optional[int], what: str) -> Optional[DiskFull]:
    """The DiskFull that `err`, raised after `written` bytes of `target` were written, means, or None."""
    if isinstance(err, OSError) and err.errno not in NO_SPACE:
        return None
    if not isinstance(err, OSError) and not any(words in str(err) for words in TORCH_WRITE_FAILED):
        return None
    free = _free_bytes(target.parent)
    if not isinstance(err, OSError) and (free is None or free > LOW_SPACE):
        return None                     # torch's words, but space is left: some other failure
    needed = f"about {_bytes(size)}" if size else f"more than the {_bytes(written)} written"
    left = f"{_bytes(free)} free" if free is not None else "free space unknown"
    return DiskFull(f"the disk is full: cannot write {what}{target} (it needs {needed}; {left} in "
                    f"{target.parent}/); free some space and rerun")


def _size_of(path: Path) -> int:
    """Bytes under `path` (a file, or a directory's files), 0 where it is gone."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _free_bytes(directory: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _bytes(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target, size=len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target, size=len(text.encode())) as tmp:
        tmp.write_text(text)


def sync_generated(target: str | Path, wanted: str, check: bool, command: str) -> int:
    """A generated file: with `check`, exit status 1 (and a line naming `command`) if `target` is not
    `wanted`; else rewrite it atomically when it differs. Returns the exit status (0 or 1)."""
    target = Path(target)
    current = target.read_text() if target.exists() else None
    if current == wanted:
        print(f"{target}: up to date")
        return 0
    if check:
        print(f"{target} is stale: run `{command}`", file=sys.stderr)
        return 1
    write_text(target, wanted)
    print(f"{target}: rewritten")
    return 0


def write_json(target: str | Path, data: Any) -> None:
    write_text(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_figure(fig, target: str | Path, **kwargs) -> None:
    """Save a matplotlib figure atomically and close it (a pyplot figure; a bare `Figure` has nothing
    to close)."""
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=Path(target).suffix.lstrip(".") or "png", **kwargs)
    if getattr(fig.canvas, "manager", None) is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `target` as a whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    _as_created(tmp, directory=True)
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except (OSError, RuntimeError) as err:
        full = _disk_full(err, target, _size_of(tmp), None, "")
        if full is None:
            raise
        raise full from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
