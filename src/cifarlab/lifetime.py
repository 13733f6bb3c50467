"""Process lifetime: nothing a stage starts outlives it, and a stop request ends it cleanly.

- `die_with_parent()` asks the Linux kernel to SIGKILL this process when its parent dies
  (prctl PR_SET_PDEATHSIG). The train stage calls it first thing, every process of a distributed
  run calls it, and so does every DataLoader worker (`worker_init`): killing `dvc repro` (or the
  launcher of a distributed run) with any signal, SIGKILL included, takes the trainer and its
  workers with it. Elsewhere than Linux it does nothing.
- `stop_on_sigterm()` makes SIGTERM behave as Ctrl-C does (a KeyboardInterrupt), so `kill`, a
  job scheduler or a closing terminal runs the same clean-up as Ctrl-C: temporary files removed,
  the trainer's "interrupted during epoch N ... rerun to resume" line. `stop_signal()` says which
  signal stopped the process, if any.

No torch here: the train stage calls this before importing anything heavy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from typing import Optional

PR_SET_PDEATHSIG = 1
LAUNCHER_PID_ENV = "CIFARLAB_LAUNCHER_PID"   # set by `distributed.launch` for the processes it starts

_received: Optional[int] = None


def die_with_parent(expected_parent: Optional[int] = None) -> bool:
    """Have the kernel SIGKILL this process when its parent exits; True where that is armed.

    If `expected_parent` is given and the parent is already another process (it died before the
    request was armed), exit at once instead.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)      # the parent died between starting us and the request: nobody is waiting for us
    return armed


def launcher_pid() -> Optional[int]:
    """The pid of the `distributed.launch` process that started this one, if any."""
    value = os.environ.get(LAUNCHER_PID_ENV)
    return int(value) if value and value.isdigit() else None


def _stop(signum, frame) -> None:
    global _received
    if _received is not None:
        return          # already stopping (Ctrl-C reaches a process directly and again through its launcher)
    _received = signum
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM (and SIGINT, as usual) raise KeyboardInterrupt and are remembered by `stop_signal`."""
    signal.signal(signal.SIGTERM, _stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _stop)


def stop_signal() -> Optional[int]:
    """The signal (SIGINT or SIGTERM) that interrupted this process, or None."""
    return _received


def signal_name(signum: Optional[int]) -> str:
    return signal.Signals(signum).name if signum else "SIGINT"


def worker_init(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the worker dies with the process that started it, and stops on
    SIGTERM as on Ctrl-C (quietly: its parent reports the interruption)."""
    die_with_parent()
    stop_on_sigterm()
