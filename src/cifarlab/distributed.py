"""Distributed data parallel training under `torchrun`.

The train stage's command is `torchrun --standalone --nproc_per_node=${runtime.nproc} ...`
(dvc.yaml templates it from params). With one process nothing here does anything; with several,
each process trains on its contiguous share of every global batch (`data.GlobalBatchSampler`),
gradients are averaged by DistributedDataParallel, and only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cifarlab.errors import CifarlabError


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


def check_batch_size(batch_size: int, world: Distributed) -> None:
    if batch_size % world.world_size:
        raise CifarlabError(f"train.batch_size is {batch_size}; allowed: a multiple of the number of processes "
                            f"(runtime.nproc = {world.world_size})")


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over all processes (identity in a single process)."""
    if not dist.is_available() or not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_process(flag: torch.Tensor) -> bool:
    """True if `flag` is set on any process (a collective: every process must call it)."""
    if dist.is_available() and dist.is_initialized():
        flag = flag.to(torch.int32).clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
