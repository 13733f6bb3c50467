"""Splits as batches: the augmented, shuffled training loader whose batches and augmentations are
a function of (seed, epoch) only, and the plain in-order batches every evaluation reads.

The training loader's DataLoader workers live as long as the loader (persistent workers): each
epoch reuses them instead of starting new ones. A worker holds its own copy of the dataset, made
when it started, so the epoch reaches it inside the indices themselves: the sampler sends
(epoch, index) pairs, and an image's augmentation is reseeded from (seed, epoch, index) alone."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Protocol, Union

import numpy as np
import torch

from cifarlab.config.params import AugmentParams
from cifarlab.data.augment import build_train_transform
from cifarlab.data.batch_augment import BatchAugment
from cifarlab.data.storage import Split
from cifarlab.errors import CifarlabError
from cifarlab.lifetime import worker_init


class Placement(Protocol):
    """Where the batches go: what a loader reads of `engine.runtime.Runtime` (the data wing sits below
    the engine, so it names the two attributes instead of importing the class)."""

    device: torch.device
    num_workers: int


class ImageDataset(torch.utils.data.Dataset):
    """A split as (uint8 CHW tensor, label) pairs, with an optional per-image albumentations transform.

    The transform is reseeded for every image from (seed, epoch, index), so an image's augmentation
    depends on nothing else: not on the worker that loads it, the number of workers, or which
    process of a distributed run it lands on.
    """

    def __init__(self, split: Split, transform: Optional[Callable] = None, seed: int = 0):
        self.split = split
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: Union[int, tuple[int, int]]):
        """Image `key` augmented for `self.epoch`, or for `epoch` when `key` is an (epoch, index) pair
        (what the training loader's sampler sends its workers)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        image = self.split.images[index]
        if self.transform is not None:
            self.transform.set_random_seed((self.seed * 1_000_003 + epoch) * 100_003 + index)
            image = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.split.labels[index])


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches whose order depends only on (seed, epoch); with `world_size` > 1, this
    process's contiguous share of each global batch.

    The union of all processes' shares of step k is exactly the single-process batch k, so a
    distributed run sees the same global batches as a single-process run of the same batch size.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        # A last batch too small to give every process an image is dropped (distributed runs only).
        return full + (1 if rest >= self.world_size and not self.drop_last else 0)

    def __iter__(self):
        return self.batches(self.epoch)

    def batches(self, epoch: int) -> Iterator[list[int]]:
        """This process's share of every global batch of `epoch`, in order."""
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for step in range(len(self)):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            share = -(-len(batch) // self.world_size)
            yield batch[self.rank * share:(self.rank + 1) * share]


class EpochTaggedBatches(torch.utils.data.Sampler):
    """The batch sampler's batches for its current epoch, each index paired with that epoch, so a
    persistent worker (whose dataset copy never sees `epoch` change) augments for the right epoch."""

    def __init__(self, sampler: GlobalBatchSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch      # read now, not when the first batch is drawn
        return ([(epoch, index) for index in batch] for batch in self.sampler.batches(epoch))


class EpochLoader:
    """A shuffling training loader whose batches and augmentations are a function of (seed, epoch).

    One DataLoader serves every epoch, with persistent workers: `epoch(n)` points it at epoch n and
    returns it; iterating it gives that epoch's batches, from workers started only once. Its private
    generator keeps it from drawing on the global torch RNG (a fresh DataLoader iterator draws a
    base seed, a persistent one only the first time), so the training RNG stream (dropout) does not
    depend on how many iterators were started: a resumed run draws exactly what an uninterrupted one
    does.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, num_workers: int, pin_memory: bool,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.dataset = dataset
        self.sampler = GlobalBatchSampler(len(dataset), batch_size, seed, rank, world_size, drop_last)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        dataset.seed = seed
        self.loader: Optional[torch.utils.data.DataLoader] = torch.utils.data.DataLoader(
            dataset, batch_sampler=EpochTaggedBatches(self.sampler), num_workers=num_workers,
            pin_memory=pin_memory, prefetch_factor=4 if num_workers else None,
            persistent_workers=num_workers > 0, worker_init_fn=worker_init,   # workers die with this process
            generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> torch.utils.data.DataLoader:
        """The DataLoader, set to `epoch`: iterate it once for that epoch's batches. Starting the
        iteration hands the workers that epoch's first batches at once (`prefetch_factor` each)."""
        if self.loader is None:
            raise CifarlabError("this training loader is closed")
        self.dataset.epoch = epoch      # for a loader without workers; workers read the epoch from the indices
        self.sampler.epoch = epoch
        return self.loader

    def close(self) -> None:
        """Stop the workers now (they also stop with this process)."""
        self.loader = None


class ResidentBatches:
    """A split in order, unaugmented, held on `device` once: every pass serves the same tensors, so a
    per-epoch test pass copies nothing. Images are uint8 [B, 3, 32, 32] views of NHWC memory, which is
    the channels_last layout; labels int64 [B]. On the CPU they share the split's memory."""

    def __init__(self, split: Split, batch_size: int, device: torch.device):
        self.images = torch.from_numpy(split.images).to(device).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]


def iterate_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split in order, unaugmented, as (uint8 [B, 3, 32, 32], int64 [B]) batches."""
    images = torch.from_numpy(split.images).permute(0, 3, 1, 2)   # a view: NCHW over HWC memory
    labels = torch.from_numpy(split.labels)
    for start in range(0, len(split), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]


def train_loader(split: Split, augment: AugmentParams, batch_size: int, seed: int, runtime: Placement,
                 rank: int = 0, world_size: int = 1, path: Optional[str] = None, drop_last: bool = False
                 ) -> "EpochLoader | DeviceBatchLoader":
    """The augmented (`augment` params), shuffled training loader for the device, on `path` ("batch" or
    "per_image"; by default the one `augment_path` chooses); in a distributed run, this process's
    share of every global batch; with `drop_last`, no epoch ends on a smaller batch."""
    if batch_size > len(split):
        raise CifarlabError(f"train.batch_size is {batch_size}; allowed: at most the training split size "
                            f"({len(split)})")
    if (path or augment_path(augment, runtime)[0]) == "batch":
        return DeviceBatchLoader(split, BatchAugment.from_params(augment), batch_size, seed, runtime.device,
                                 rank, world_size, drop_last)
    return EpochLoader(ImageDataset(split, build_train_transform(augment)), batch_size, seed, runtime.num_workers,
                       pin_memory=runtime.device.type == "cuda", rank=rank, world_size=world_size,
                       drop_last=drop_last)


class DeviceBatchLoader:
    """The batch augmentation path: the whole split lives on the training device as uint8, and each
    batch is gathered and augmented there (`batch_augment.BatchAugment`) with no worker processes.

    Same batches as `EpochLoader` for the same (seed, epoch) (the same `GlobalBatchSampler`), and each
    image's augmentation is a function of (seed, epoch, index), so resume and DDP behave the same.
    """

    def __init__(self, split: Split, augment: BatchAugment, batch_size: int, seed: int, device: torch.device,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.images = torch.from_numpy(split.images).to(device).permute(0, 3, 1, 2)   # a view: NCHW over NHWC
        self.labels = torch.from_numpy(split.labels).to(device)
        self.augment = augment
        self.seed = seed
        self.sampler = GlobalBatchSampler(len(split), batch_size, seed, rank, world_size, drop_last)

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> "_DeviceEpoch":
        """`epoch`'s batches."""
        return _DeviceEpoch(self, epoch)


class _DeviceEpoch:
    def __init__(self, loader: DeviceBatchLoader, epoch: int):
        self.loader, self.number = loader, epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = self.loader
        batches = list(loader.sampler.batches(self.number))
        # The epoch's indices reach the device in one copy: a copy per batch would make the host wait
        # for the previous step on a GPU every time, and the device would idle while the host queues the next.
        order = torch.tensor([index for batch in batches for index in batch])
        if loader.images.device.type == "cuda":
            order = order.pin_memory().to(loader.images.device, non_blocking=True)
        for indices in torch.split(order, [len(batch) for batch in batches]):
            yield loader.augment(loader.images[indices], indices, loader.seed, self.number), loader.labels[indices]


def augment_path(augment: AugmentParams, runtime: Placement) -> tuple[str, str]:
    """(path, why): `augment.path`, with `auto` resolved for the device."""
    if augment.path != "auto":
        return augment.path, "augment.path"
    if runtime.device.type == "cuda":
        return "batch", "augment.path auto on CUDA: per-image workers would hold a fast GPU back"
    return "per_image", "augment.path auto on CPU: loader workers run beside the training threads"
