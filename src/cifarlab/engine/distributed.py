"""Distributed data parallel training: one process per device, started by the train stage itself.

`python stages/train.py` with `runtime.nproc: 1` trains in its own process. With `runtime.nproc: N > 1`
it becomes a small launcher (`launch`): it starts N copies of itself on this machine with the
environment torchrun would give them (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT), each of
which dies with the launcher (`lifetime.die_with_parent`), forwards Ctrl-C/SIGTERM to them, and
prints a failure's one line once (the processes leave it in a file instead of printing it). The
processes share the launcher's slot (`cifarlab.engine.slots`): its GPUs as their CUDA_VISIBLE_DEVICES,
or its threads, and they inherit its locks, so the slot is held as long as any of them runs.

With `runtime.nnodes` M > 1 the same command on each of M machines makes one run: each launcher
joins torchrun's c10d rendezvous at `runtime.rdzv_endpoint` (`_rendezvous`), which numbers the
machines in the order they join, and starts its N processes with their global ranks. So every
machine runs the same command with the same params.yaml, and no machine needs its own rank. A
process started by torchrun itself sees WORLD_SIZE and simply joins the group.

Each process trains on its contiguous share of every global batch (`loaders.GlobalBatchSampler`),
gradients are averaged by DistributedDataParallel, and only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from cifarlab.errors import ERROR_FILE_ENV, CifarlabError
from cifarlab.lifetime import LAUNCHER_PID_ENV, signal_name

FAILURE_GRACE_S = 5.0      # after one process fails, how long the others get to stop on their own
INTERRUPT_GRACE_S = 15.0   # after Ctrl-C/SIGTERM, how long the processes get to save and stop
RDZV_ID = "cifarlab-train"  # the rendezvous' run id: one run meets at an endpoint at a time
RDZV_JOIN_TIMEOUT_S = 900   # how long the first machine waits for the others to join
MASTER_KEY = "cifarlab/master"   # where machine 0 of the rendezvous publishes the process group's address


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True in a process of a distributed run (started by `launch` or by torchrun)."""
    return "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _address_towards(host: str) -> str:
    """This machine's address on the route to `host` (what the other machines can reach it at)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((host, 9))          # a UDP "connection" sends nothing; it only picks the route
            return sock.getsockname()[0]
    except OSError:
        return socket.getfqdn()


def _rendezvous(nnodes: int, endpoint: str) -> tuple[int, str, int, Any]:
    """(this machine's rank among `nnodes`, the process group's address and port, the rendezvous
    handler) after torchrun's c10d rendezvous at `endpoint`, the machine whose address it names
    hosting its store. The caller keeps the handler for the run: the store lives as long as it, and
    the other machines may still be reading from it when this one has read all it needs."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError

    host = endpoint.rpartition(":")[0]
    handler = registry.get_rendezvous_handler(RendezvousParameters(
        backend="c10d", endpoint=endpoint, run_id=RDZV_ID, min_nodes=nnodes, max_nodes=nnodes,
        join_timeout=RDZV_JOIN_TIMEOUT_S))
    print(f"train: waiting for {nnodes} machines at {endpoint} (runtime.rdzv_endpoint)", flush=True)
    try:
        info = handler.next_rendezvous()
    except RendezvousTimeoutError:
        raise CifarlabError(f"runtime.nnodes is {nnodes} but not every machine joined at runtime.rdzv_endpoint "
                            f"{endpoint} within {RDZV_JOIN_TIMEOUT_S} s; start `python stages/train.py` on each "
                            f"of the {nnodes} machines") from None
    except RendezvousConnectionError:
        raise CifarlabError(f"cannot reach runtime.rdzv_endpoint {endpoint}: set it to HOST:PORT of one of the "
                            f"machines, with the port free there and open to the others") from None
    store, node_rank = (info[0], info[1]) if isinstance(info, tuple) else (info.store, info.rank)   # torch < 2.4: a tuple
    if node_rank == 0:
        store.set(MASTER_KEY, f"{_address_towards(host)}:{free_port()}")
    address, _, port = store.get(MASTER_KEY).decode().rpartition(":")
    return node_rank, address, int(port), handler


def launch(nproc: int, script: str, slot: Any = None, nnodes: int = 1,
           rdzv_endpoint: Optional[str] = None) -> None:
    """Run `python script` as `nproc` processes of one DDP run on this machine, and wait for them;
    with `nnodes` > 1 as this machine's processes of a run over `nnodes` machines (`_rendezvous`). On
    `slot` (a `slots.Slot`), the launcher's: the processes get its `child_env()` and its locks.

    Raises CifarlabError with the run's one line if any process fails: rank 0's line if it left
    one, else the first failing process's. Ctrl-C or SIGTERM of the launcher reaches every process
    (each saves nothing half-written and stops); a process that does not stop is killed. The
    processes die with the launcher, so killing it (even with SIGKILL) leaves none behind.
    """
    node_rank, address, port, rendezvous = (_rendezvous(nnodes, rdzv_endpoint) if nnodes > 1
                                            else (0, "127.0.0.1", free_port(), None))
    world = nproc * nnodes
    work = Path(tempfile.mkdtemp(prefix="cifarlab-ddp-"))
    env = dict(os.environ, MASTER_ADDR=address, MASTER_PORT=str(port), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK=str(node_rank), ROLE_WORLD_SIZE=str(world),
               TORCHELASTIC_RUN_ID="cifarlab", **{LAUNCHER_PID_ENV: str(os.getpid())})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if slot is not None:
        env.update(slot.child_env())
    stopped: list[int] = []

    def forward(signum, frame) -> None:       # Ctrl-C reaches the whole group; `kill` only us: forward it
        stopped.append(signum)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    processes: list[subprocess.Popen] = []
    logs = []
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(nproc):
            global_rank = node_rank * nproc + rank
            rank_env = dict(env, RANK=str(global_rank), LOCAL_RANK=str(rank), ROLE_RANK=str(global_rank),
                            **{ERROR_FILE_ENV: str(work / f"rank{rank}.error")})
            log = None if rank == 0 else open(work / f"rank{rank}.log", "wb")   # local rank 0 alone talks
            logs.append(log)
            processes.append(subprocess.Popen([sys.executable, script], env=rank_env, stdout=log,
                                              stderr=subprocess.STDOUT if log else None,
                                              pass_fds=slot.fds if slot is not None else ()))
        first_failed: Optional[int] = None
        deadline: Optional[float] = None       # when the processes still running get killed
        while any(p.poll() is None for p in processes):
            if first_failed is None:
                first_failed = next((r for r, p in enumerate(processes) if p.poll() not in (None, 0)), None)
                if first_failed is not None:
                    deadline = time.monotonic() + FAILURE_GRACE_S
            if stopped and deadline is None:
                deadline = time.monotonic() + INTERRUPT_GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                for process in processes:
                    if process.poll() is None:
                        process.kill()
            time.sleep(0.05)
        codes = [p.wait() for p in processes]
        if first_failed is None:
            first_failed = next((rank for rank, code in enumerate(codes) if code != 0), None)
        if first_failed is None:
            return                              # every process finished the run
        messages = {rank: (work / f"rank{rank}.error").read_text() for rank in range(nproc)
                    if (work / f"rank{rank}.error").exists()}
        if 0 in messages:
            message, code = messages[0], codes[0] if codes[0] > 0 else 1
        elif messages:
            rank = first_failed if first_failed in messages else min(messages)
            message, code = messages[rank], codes[rank] if codes[rank] > 0 else 1
        elif stopped:
            message, code = f"interrupted ({signal_name(stopped[0])})", 128 + stopped[0]
        else:
            rank, code = first_failed, codes[first_failed]
            if rank:
                tail = (work / f"rank{rank}.log").read_text(errors="replace").splitlines()[-30:]
                print("\n".join(tail), file=sys.stderr)
            how = f"was killed by {signal_name(-code)}" if code < 0 else f"exited with {code}"
            message, code = (f"training process {rank} of {nproc} {how} (its output is above)",
                             code if code > 0 else 1)
        error = CifarlabError(message)
        error.exit_code = code
        raise error
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            if log is not None:
                log.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        del rendezvous                          # the store (on its host) outlives every machine's reads
        for path in work.iterdir():
            path.unlink()
        work.rmdir()


def init_distributed(device_type: str) -> Distributed:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank)


def check_batch_size(batch_size: int, world: Distributed, nnodes: int = 1) -> None:
    if batch_size % world.world_size:
        count = (f"runtime.nproc = {world.world_size}" if nnodes == 1 else
                 f"runtime.nproc x runtime.nnodes = {world.world_size // nnodes} x {nnodes}")
        raise CifarlabError(f"train.batch_size is {batch_size}; allowed: a multiple of the number of processes "
                            f"({count})")


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over all processes (identity in a single process)."""
    if not dist.is_available() or not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def distributed_run() -> bool:
    """True in a process of a distributed run (the process group is up)."""
    return dist.is_available() and dist.is_initialized()


def any_process(flag: torch.Tensor) -> bool:
    """True if `flag` is set on any process (a collective: every process must call it)."""
    if dist.is_available() and dist.is_initialized():
        flag = flag.to(torch.int32).clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def gather_objects(value: Any) -> list[Any]:
    """Every process's `value`, in rank order (a collective: every process must call it)."""
    if not dist.is_available() or not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
