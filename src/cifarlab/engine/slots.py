"""Slots: the share of this machine a training run takes, so that concurrent runs (queue workers,
`dvc exp run` in two clones, a notebook beside a queue) do not pile onto GPU 0 or oversubscribe
the cores.

A slot is a lock file under one machine-wide folder (`slots_dir`), held with `fcntl.flock`: the
kernel releases it when the holding process ends, however it ends (SIGKILL included), so a slot
never leaks and nothing needs cleaning up. The files are never deleted (a deleted file could be
locked by one run while the next creates a new one under the same name); taking or counting slots
happens under `slots.lock`, so two runs starting together see each other.

- CUDA: one `gpu-<name>.lock` per GPU of the pool (the entries of CUDA_VISIBLE_DEVICES when it is
  set, else 0..N-1). A run takes the first free GPU (a DDP run its nproc GPUs, all at once); when
  none is free it waits, saying so once, rather than sharing one: two runs on one GPU risk running
  out of its memory and each trains slower, whereas waiting finishes the queue in the same time.
  `runtime.device: cuda:N` takes GPU N whatever holds it (and says when another run does).
- CPU: one `cpu-<k>.lock` per run training; the cores are divided between the runs holding one when
  a run starts (`cpu_share`), its loader workers counted in its share.

`claim_for` is what a training stage calls (train, lr_find); `runtime.select_runtime` then trains on
the slot it returns. The stages that do not train (download, max_lr, evaluate, report) take none:
evaluate is one pass over the test split, seconds on a GPU, and waiting minutes for a GPU to run it
would cost more than sharing one briefly. No torch here but in `claim_for` (imported there): the
tests hold slots from cheap `python -c` processes with fake GPU pools.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from cifarlab.errors import CifarlabError

SLOTS_DIR_ENV = "CIFARLAB_SLOTS_DIR"   # overrides the folder (tests; a machine whose /tmp is not shared by its runs)
SLOT_ENV = "CIFARLAB_SLOT"             # set by `distributed.launch`: the slot its processes share (JSON)
POLL_SECONDS = 1.0                     # how often a waiting run looks for a free GPU


@dataclass
class Slot:
    """What a run holds and the share it trains on; `record()` is what metrics/train_speed.json keeps."""

    kind: str                          # "cuda" or "cpu"
    label: str                         # the log's line, e.g. "GPU 2 of 4" or "1 of 2 cores: 2 runs training"
    reason: str                        # why this share
    gpus: list[str] = field(default_factory=list)      # cuda: the pool entries held (or used)
    indices: list[int] = field(default_factory=list)   # cuda: their torch indices in this process
    pool: int = 0                      # cuda: GPUs in the pool
    cores: int = 0                     # cpu: cores this process may use (affinity)
    runs_training: int = 1             # runs holding a slot of this kind when this one started, itself included
    number: int = 0                    # cpu: the slot's number (cpu-<number>.lock)
    threads: int = 0                   # cpu: torch threads per training process
    num_workers: int = 0               # cpu: loader workers per training process
    waited_seconds: float = 0.0
    fds: list[int] = field(default_factory=list, repr=False)   # the held locks (empty once released)

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "fds"}

    def child_env(self) -> dict[str, str]:
        """The environment of the processes a launcher starts on this slot (they hold nothing themselves:
        they inherit the locks' descriptors, so the slot outlives the launcher as long as they run)."""
        env = {SLOT_ENV: json.dumps(self.record())}
        if self.kind == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        else:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env

    def release(self) -> None:
        global _held
        for fd in self.fds:
            os.close(fd)                # closing the descriptor releases the flock
        self.fds = []
        if _held is self:
            _held = None


_held: Optional[Slot] = None            # this process's slot: a process trains on one slot at a time


def slots_dir() -> Path:
    """$CIFARLAB_SLOTS_DIR, else /tmp/cifarlab-slots-<uid>: one folder for every run of this user on this
    machine. Not $XDG_RUNTIME_DIR: cron jobs and detached runs often lack it, and logind removes it at the
    last logout, under a run still holding a slot there."""
    chosen = os.environ.get(SLOTS_DIR_ENV)
    folder = Path(chosen) if chosen else Path(tempfile.gettempdir()) / f"cifarlab-slots-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError as err:
        raise CifarlabError(f"cannot use the slots folder {folder}: {err.strerror}; set {SLOTS_DIR_ENV} to a "
                            f"folder this user may write") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise CifarlabError(f"the slots folder {folder} is not a folder of this user; set {SLOTS_DIR_ENV} to one")
    return folder


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _try_lock(path: Path) -> Optional[int]:
    """The descriptor of `path` locked by us, or None when another process holds it."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _held_by_another(path: Path) -> bool:
    fd = _try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


def _note(fd: int, stage: str) -> None:
    """Who holds the lock, for the waiting line of the runs that find it taken."""
    note = json.dumps({"pid": os.getpid(), "stage": stage, "cwd": os.getcwd()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, note, 0)


def _holder(path: Path) -> str:
    try:
        note = json.loads(path.read_text())
        return f"pid {note['pid']} {note['stage']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run"


class _Mutex:
    """`slots.lock`, held while a run takes or counts slots (briefly)."""

    def __init__(self, folder: Path):
        self.path = folder / "slots.lock"

    def __enter__(self) -> None:
        self.fd = _open(self.path)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _gpu_file(folder: Path, name: str) -> Path:
    return folder / f"gpu-{''.join(c if c.isalnum() or c in '-.' else '_' for c in name)}.lock"


def gpu_pool(device_count: int) -> list[str]:
    """The GPUs runs share: the entries of CUDA_VISIBLE_DEVICES (as many as torch sees) or 0..count-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return [entry.strip() for entry in visible.split(",")][:device_count]
    return [str(index) for index in range(device_count)]


def _pool_words(pool: Sequence[str], names: Sequence[str]) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    which = "GPUs " + ",".join(names) if len(names) > 1 else f"GPU {names[0]}"
    return f"{which} of {len(pool)}" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible and visible.strip() else "")


def claim_gpus(stage: str, pool: Sequence[str], count: int = 1, *, timeout: Optional[float] = None,
               out=None) -> Slot:
    """Hold `count` free GPUs of `pool` (all at once, so two DDP runs never deadlock on halves); while
    fewer are free, wait, saying once what for. `timeout` (tests only) gives up with a CifarlabError."""
    out = out or sys.stdout
    if count > len(pool):
        raise CifarlabError(f"runtime.nproc is {count} but {len(pool)} GPU{'s are' if len(pool) != 1 else ' is'} "
                            f"visible; allowed: runtime.nproc at most {len(pool)} on this machine")
    folder = slots_dir()
    started, said = time.monotonic(), False
    while True:
        with _Mutex(folder):
            taken: list[tuple[int, int]] = []
            for index, name in enumerate(pool):
                fd = _try_lock(_gpu_file(folder, name))
                if fd is not None:
                    taken.append((index, fd))
                    if len(taken) == count:
                        break
            if len(taken) == count:
                for _, fd in taken:
                    _note(fd, stage)
                held = sum(_held_by_another(_gpu_file(folder, name)) for name in pool)   # ours included
                names = [pool[index] for index, _ in taken]
                waited = time.monotonic() - started
                reason = (f"the first {count} free GPUs" if count > 1 else "the first free GPU") + (
                    f", after waiting {waited:.0f} s" if said else "")
                return Slot("cuda", f"{_pool_words(pool, names)}: {reason} ({held} of {len(pool)} held by runs of "
                            f"this project)", reason, names, [index for index, _ in taken], len(pool), runs_training=held,
                            waited_seconds=waited, fds=[fd for _, fd in taken])
            for _, fd in taken:
                os.close(fd)
            if not said:
                holders = [f"GPU {name}: {_holder(_gpu_file(folder, name))}" for name in pool
                           if _held_by_another(_gpu_file(folder, name))]
                print(f"{stage}: waiting for {count} free GPU{'s' if count > 1 else ''}: {len(holders)} of "
                      f"{len(pool)} are held by runs of this project ({'; '.join(holders)}); "
                      f"runtime.device: cuda:N would share GPU N instead", file=out, flush=True)
                said = True
        if timeout is not None and time.monotonic() - started > timeout:
            raise CifarlabError(f"no free GPU within {timeout:g} s")
        time.sleep(POLL_SECONDS)


def claim_gpu_named(stage: str, pool: Sequence[str], index: int) -> Slot:
    """`runtime.device: cuda:N`: GPU N, held if free, used anyway (and said so) if another run holds it."""
    if not 0 <= index < len(pool):
        raise CifarlabError(f"runtime.device is cuda:{index} but {len(pool)} GPU{'s are' if len(pool) != 1 else ' is'}"
                            f" visible; allowed: cuda:0..cuda:{len(pool) - 1}, cuda or auto")
    folder = slots_dir()
    with _Mutex(folder):
        path = _gpu_file(folder, pool[index])
        fd = _try_lock(path)
        holder = _holder(path) if fd is None else ""
        if fd is not None:
            _note(fd, stage)
    reason = f"runtime.device cuda:{index}" + (f", shared: {holder} holds it" if fd is None else "")
    return Slot("cuda", f"{_pool_words(pool, [pool[index]])}: {reason}", reason, [pool[index]], [index], len(pool),
                fds=[fd] if fd is not None else [])


def cpu_share(cores: int, runs: int, nproc: int = 1, num_workers: Optional[int] = None,
              threads: Optional[int] = None) -> tuple[int, int, int]:
    """(cores for this run, torch threads per process, loader workers per process): the cores divided
    between the runs training (at least 1 each), then between the run's `nproc` processes, whose loader
    workers come out of the same share. `num_workers`/`threads` None = auto; given, they are kept."""
    share = max(1, cores // max(1, runs))
    per_process = max(1, share // nproc)
    workers = num_workers if num_workers is not None else (1 if per_process > 1 else 0)
    return share, threads if threads is not None else max(1, per_process - workers), workers


def claim_cores(stage: str, cores: int, nproc: int = 1, num_workers: Optional[int] = None,
                threads: Optional[int] = None) -> Slot:
    """Hold a CPU slot and divide the cores between the runs holding one now (this one included)."""
    folder = slots_dir()
    with _Mutex(folder):
        number, fd = 1, None
        while fd is None:
            fd = _try_lock(folder / f"cpu-{number}.lock")
            number += fd is None
        _note(fd, stage)
        others = sum(_held_by_another(path) for path in folder.glob("cpu-*.lock")
                     if path.name != f"cpu-{number}.lock")
    runs = others + 1
    share, per_thread, workers = cpu_share(cores, runs, nproc, num_workers, threads)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    capped = threads is None and omp.isdigit() and 0 < int(omp) < per_thread
    if capped:
        per_thread = int(omp)
    how = (f"{per_thread} thread{'s' if per_thread != 1 else ''}"
           + (" (runtime.threads)" if threads is not None else f" (OMP_NUM_THREADS={omp})" if capped else "")
           + f" + {workers} loader worker{'s' if workers != 1 else ''}" + (" per process" if nproc > 1 else ""))
    reason = f"{runs} run{'s' if runs != 1 else ''} training"
    return Slot("cpu", f"{share} of {cores} cores: {reason} (slot {number}), {how}", reason, cores=cores,
                runs_training=runs, number=number, threads=per_thread, num_workers=workers, fds=[fd])


def inherited() -> Optional[Slot]:
    """In a process a launcher started on its slot: that slot (its GPU is cuda:LOCAL_RANK here)."""
    value = os.environ.get(SLOT_ENV)
    if not value:
        return None
    slot = Slot(**json.loads(value))
    if slot.kind == "cuda":
        slot.indices = [int(os.environ.get("LOCAL_RANK", "0"))]
    return slot


def held() -> Optional[Slot]:
    """The slot this process holds (`claim_for`), if any."""
    return _held


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as taskset or a batch system sets it)."""
    cores = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        cores = min(cores, len(os.sched_getaffinity(0)) or cores)
    return cores


def claim_for(params, stage: str, processes: int = 1) -> Optional[Slot]:
    """The share of the machine a training stage trains on (`params`: the runtime params), held until
    the process ends or `release()`, and announced in one line. In a process a launcher started: the
    launcher's slot; in one torchrun started: None (torchrun placed it). None also when runtime.device
    asks for CUDA on a machine without it (select_runtime says so)."""
    inherited_slot = inherited()
    if inherited_slot is not None or "WORLD_SIZE" in os.environ:
        return inherited_slot
    import torch

    kind, _, index = params.device.partition(":")
    if kind == "cuda" and not torch.cuda.is_available():
        return None
    global _held
    if _held is not None:
        _held.release()               # a second stage in one process (tests) is one run, not two
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        pool = gpu_pool(torch.cuda.device_count())
        slot = claim_gpu_named(stage, pool, int(index)) if index else claim_gpus(stage, pool, processes)
    else:
        slot = claim_cores(stage, available_cores(), processes,
                           None if params.num_workers == "auto" else params.num_workers,
                           None if params.threads == "auto" else params.threads)
    print(f"{stage}: {slot.label}", flush=True)
    _held = slot
    return slot
