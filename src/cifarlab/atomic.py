"""Write outputs atomically: to a temporary name beside the target, then rename.

A stage that fails halfway leaves either the previous file or nothing, never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator


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
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success rename it to `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    _as_created(tmp_path)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
