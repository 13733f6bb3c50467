"""CIFAR-10 on disk and in memory: download, the offline synthetic set, datasets and loaders.

The dataset lives under `data/` as two uncompressed .npz files of uint8 arrays (images
[N, 32, 32, 3] HWC, labels [N]) plus `meta.json` (source, class names, sizes). The normalisation
constants are defined here once; `Normalize` applies them inside the model, so every consumer
(training, evaluation, LR finder, Grad-CAM) feeds raw uint8 images and cannot normalise twice or
with different numbers.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cifarlab.atomic import atomic_dir
from cifarlab.errors import CifarlabError
from cifarlab.lifetime import worker_init
from cifarlab.params import IMAGE_SIDE

# Per-channel statistics of the CIFAR-10 training split (pixel values scaled to [0, 1]).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_TRAIN_SIZE = 50_000
CIFAR10_TEST_SIZE = 10_000
NUM_CLASSES = 10

DOWNLOAD_TIMEOUT_S = 60


class DataError(CifarlabError):
    """The dataset cannot be fetched, verified or read."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray   # uint8 [N, 32, 32, 3]
    labels: np.ndarray   # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    classes: tuple[str, ...]
    source: str


# --- download -----------------------------------------------------------------------------------

def fetch(url: str, dest: Path, expected_md5: str) -> None:
    """Stream `url` to `dest`, verifying its md5; any failure is a DataError naming the cause."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", leave=False) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(
            f"cannot download {url}: {reason}; set data.url (and data.md5) to a reachable mirror, "
            f"or use data.source: synthetic to work offline") from None
    actual = digest.hexdigest()
    if actual != expected_md5:
        raise DataError(
            f"md5 of {url} is {actual} but data.md5 is {expected_md5}: the download is corrupted or "
            f"truncated, or data.md5 does not belong to this file")


def _unpickle(tar: tarfile.TarFile, member: str) -> dict:
    try:
        handle = tar.extractfile(member)
    except KeyError:
        raise DataError(f"the CIFAR-10 tarball has no {member}") from None
    return pickle.load(handle, encoding="bytes")


def _read_batches(tar: tarfile.TarFile, names: list[str]) -> Split:
    images, labels = [], []
    for name in names:
        batch = _unpickle(tar, f"cifar-10-batches-py/{name}")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def read_cifar10_tarball(path: Path, origin: Optional[str] = None) -> Dataset:
    """Convert the official python-version tarball into uint8 arrays, checking the split sizes.

    `origin` (the URL it was downloaded from) is what error messages name instead of `path`, a
    temporary file the user never sees."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            train = _read_batches(tar, [f"data_batch_{i}" for i in range(1, 6)])
            test = _read_batches(tar, ["test_batch"])
            meta = _unpickle(tar, "cifar-10-batches-py/batches.meta")
    except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError, ValueError) as err:
        detail = str(err).replace(str(path), "the file") or type(err).__name__
        if origin is None:
            raise DataError(f"{path} is not a readable CIFAR-10 python tarball: {detail}") from None
        raise DataError(f"the download from {origin} is not a readable CIFAR-10 python tarball ({detail}); "
                        f"set data.url to the python-version tarball (cifar-10-python.tar.gz) and data.md5 "
                        f"to its md5") from None
    classes = tuple(name.decode() for name in meta[b"label_names"])
    if (len(train), len(test)) != (CIFAR10_TRAIN_SIZE, CIFAR10_TEST_SIZE):
        raise DataError(f"CIFAR-10 tarball has {len(train)} train / {len(test)} test images, "
                        f"expected {CIFAR10_TRAIN_SIZE} / {CIFAR10_TEST_SIZE}")
    return Dataset(train, test, classes, "cifar10")


# --- synthetic ----------------------------------------------------------------------------------

SYNTH_OVERLAP = 0.6   # an image blends in up to this share of another class's prototype ...
SYNTH_NOISE = 0.15     # ... plus Gaussian pixel noise of this std (pixel values in 0..1)


def make_synthetic(train_size: int, test_size: int, seed: int) -> Dataset:
    """A deterministic, CIFAR-shaped 10-class set that needs no network, learnable but not trivial.

    Each class has a mean colour and a smooth spatial pattern (a random 4x4 grid of colours,
    upsampled). An image blends its class prototype with another class's (the other weighs up to
    `SYNTH_OVERLAP`), then gets random contrast, a random shift and pixel noise. So classes overlap: a
    small net learns it well above chance but cannot reach 100%, and the mistakes gallery, Grad-CAM
    and the confusion matrix of every test run have real content.
    """
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.2, 0.8, size=(NUM_CLASSES, 1, 1, 3))
    grids = rng.uniform(-0.25, 0.25, size=(NUM_CLASSES, 4, 4, 3))
    patterns = grids.repeat(8, axis=1).repeat(8, axis=2)                 # [10, 32, 32, 3]
    prototypes = np.clip(colours + patterns, 0.0, 1.0)

    def split(size: int) -> Split:
        labels = np.arange(size) % NUM_CLASSES
        rng.shuffle(labels)
        others = (labels + rng.integers(1, NUM_CLASSES, size=size)) % NUM_CLASSES
        blend = rng.uniform(0.0, SYNTH_OVERLAP, size=(size, 1, 1, 1))
        contrast = rng.uniform(0.6, 1.2, size=(size, 1, 1, 1))
        shifts = rng.integers(-3, 4, size=(size, 2))
        images = np.empty((size, 32, 32, 3), dtype=np.float64)
        for i, (label, other, (dy, dx)) in enumerate(zip(labels, others, shifts)):
            images[i] = np.roll(prototypes[label], (dy, dx), axis=(0, 1))
            images[i] += blend[i] * (np.roll(prototypes[other], (dy, dx), axis=(0, 1)) - images[i])
        images = 0.5 + contrast * (images - 0.5) + rng.normal(0.0, SYNTH_NOISE, size=images.shape)
        return Split(np.clip(images * 255.0, 0, 255).round().astype(np.uint8), labels.astype(np.int64))

    train, test = split(train_size), split(test_size)
    return Dataset(train, test, tuple(f"synthetic-{i}" for i in range(NUM_CLASSES)), "synthetic")

# --- on disk ------------------------------------------------------------------------------------

def save_dataset(dataset: Dataset, data_dir: str | Path, extra_meta: Optional[dict] = None) -> None:
    """Write `data_dir` as a whole, atomically: train.npz, test.npz, meta.json."""
    with atomic_dir(data_dir) as tmp:
        for name, split in (("train", dataset.train), ("test", dataset.test)):
            np.savez(tmp / f"{name}.npz", images=split.images, labels=split.labels)
        meta = {"source": dataset.source, "classes": list(dataset.classes),
                "train_size": len(dataset.train), "test_size": len(dataset.test), **(extra_meta or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


RESTORE = "restore it with `dvc checkout data` (or regenerate it with `dvc repro download`)"


def _bad(path: Path, problem: str) -> DataError:
    return DataError(f"{path} {problem}: not the data the download stage wrote; {RESTORE}")


def _read_meta(data_dir: Path) -> dict:
    path = data_dir / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; run `dvc repro download` (or `dvc checkout data`)") from None
    except (OSError, ValueError) as err:
        raise _bad(path, f"is unreadable ({type(err).__name__}: {str(err)[:80]})") from None
    if not isinstance(meta, dict):
        raise _bad(path, "is not a JSON object")
    classes = meta.get("classes")
    if not (isinstance(classes, list) and len(classes) >= 2 and len(set(classes)) == len(classes)
            and all(isinstance(c, str) and c.strip() for c in classes)):
        raise _bad(path, f"has classes {str(classes)[:80]}; allowed: a list of at least 2 distinct class names")
    if meta.get("source") not in ("cifar10", "synthetic"):
        raise _bad(path, f"has source {meta.get('source')!r}; allowed: cifar10, synthetic")
    if meta["source"] == "cifar10" and tuple(classes) != CIFAR10_CLASSES:
        raise _bad(path, f"has classes {classes}; allowed for source cifar10: {', '.join(CIFAR10_CLASSES)}")
    for key in ("train_size", "test_size"):
        if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), int) or meta[key] < 1:
            raise _bad(path, f"has {key} {meta.get(key)!r}; allowed: a whole number >= 1")
    return meta


def _read_split(path: Path, size: int, num_classes: int) -> Split:
    if not path.exists():
        raise DataError(f"{path} does not exist; {RESTORE}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [name for name in ("images", "labels") if name not in arrays.files]
            if missing:
                raise _bad(path, f"has no array {missing[0]!r} (allowed: an .npz with `images` and `labels`)")
            images, labels = arrays["images"], arrays["labels"]
    except DataError:
        raise
    except Exception:  # random bytes, a truncated zip, a pickle: numpy raises several types, none says more
        raise _bad(path, "is not a readable .npz of `images` and `labels` arrays") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE, 3):
        raise _bad(path, f"holds images of shape {'x'.join(map(str, images.shape))} {images.dtype}; allowed: "
                         f"N x {IMAGE_SIDE} x {IMAGE_SIDE} x 3 uint8")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise _bad(path, f"holds labels of shape {'x'.join(map(str, labels.shape))} {labels.dtype} for "
                         f"{len(images)} images; allowed: {len(images)} whole numbers")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise _bad(path, f"holds {len(bad)} labels outside 0..{num_classes - 1} (e.g. {int(bad[0])}); "
                         f"allowed: 0..{num_classes - 1}, one per class in meta.json")
    if len(images) != size:
        raise _bad(path, f"holds {len(images)} images; meta.json says {size}")
    return Split(images, labels.astype(np.int64))


def load_dataset(data_dir: str | Path = "data") -> Dataset:
    """Read data/ and check it is what the download stage wrote: meta.json (source, distinct class
    names, split sizes) and each split's images (N x 32 x 32 x 3 uint8) and labels (in range).
    Anything else is a one-line DataError that says what is wrong and how to restore the data."""
    data_dir = Path(data_dir)
    meta = _read_meta(data_dir)
    if meta["source"] == "cifar10" and (meta["train_size"], meta["test_size"]) != (CIFAR10_TRAIN_SIZE,
                                                                                    CIFAR10_TEST_SIZE):
        raise DataError(f"{data_dir}/meta.json says {meta['train_size']} train / {meta['test_size']} test images; "
                        f"CIFAR-10 has {CIFAR10_TRAIN_SIZE} / {CIFAR10_TEST_SIZE}; {RESTORE}")
    splits = {name: _read_split(data_dir / f"{name}.npz", meta[f"{name}_size"], len(meta["classes"]))
              for name in ("train", "test")}
    return Dataset(splits["train"], splits["test"], tuple(meta["classes"]), meta["source"])


# --- in memory ----------------------------------------------------------------------------------

class Normalize(nn.Module):
    """uint8-range images [N, 3, H, W] -> float, standardised with the CIFAR-10 statistics."""

    def __init__(self, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


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

    def __getitem__(self, index: int):
        image = self.split.images[index]
        if self.transform is not None:
            self.transform.set_random_seed((self.seed * 1_000_003 + self.epoch) * 100_003 + index)
            image = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.split.labels[index])


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches whose order depends only on (seed, epoch); with `world_size` > 1, this
    process's contiguous share of each global batch.

    The union of all processes' shares of step k is exactly the single-process batch k, so a
    distributed run sees the same global batches as a single-process run of the same batch size.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        # A last batch too small to give every process an image is dropped (distributed runs only).
        return full + (1 if rest >= self.world_size else 0)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for step in range(len(self)):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            share = -(-len(batch) // self.world_size)
            yield batch[self.rank * share:(self.rank + 1) * share]


class EpochLoader:
    """A shuffling training loader whose batches and augmentations are a function of (seed, epoch)."""

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, num_workers: int, pin_memory: bool,
                 rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.sampler = GlobalBatchSampler(len(dataset), batch_size, seed, rank, world_size)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        dataset.seed = seed

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> torch.utils.data.DataLoader:
        """The DataLoader for `epoch`: iterate it once for that epoch's batches."""
        self.dataset.epoch = epoch
        self.sampler.epoch = epoch
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=self.num_workers,
            pin_memory=self.pin_memory, prefetch_factor=4 if self.num_workers else None,
            persistent_workers=False, worker_init_fn=worker_init)   # workers die with this process


def iterate_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split in order, unaugmented, as (uint8 [B, 3, 32, 32], int64 [B]) batches."""
    images = torch.from_numpy(split.images).permute(0, 3, 1, 2)   # a view: NCHW over HWC memory
    labels = torch.from_numpy(split.labels)
    for start in range(0, len(split), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]
