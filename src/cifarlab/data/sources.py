"""Where a dataset comes from: the official CIFAR-10 tarball over HTTP (checked by md5), or the
deterministic synthetic set that needs no network."""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Optional, Union

import numpy as np
from tqdm import tqdm

from cifarlab.data.storage import (CIFAR10_TEST_SIZE, CIFAR10_TRAIN_SIZE, NUM_CLASSES, DataError, Dataset, Split,
                              save_dataset)

if TYPE_CHECKING:
    from cifarlab.config.params import DataParams

DOWNLOAD_TIMEOUT_S = 60


def fetch(url: str, dest: Union[Path, BinaryIO], expected_md5: str) -> None:
    """Stream `url` to `dest` (a path, or a binary file open for writing), verifying its md5; any
    failure is a DataError naming the cause."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
                (open(dest, "wb") if isinstance(dest, (str, Path)) else contextlib.nullcontext(dest)) as out:
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


def read_cifar10_tarball(path: Union[Path, BinaryIO], origin: Optional[str] = None) -> Dataset:
    """Convert the official python-version tarball (a path, or a binary file at its start) into uint8
    arrays, checking the split sizes.

    `origin` (the URL it was downloaded from) is what error messages name instead of `path`, a
    temporary file the user never sees."""
    opened = {"name": path} if isinstance(path, (str, Path)) else {"fileobj": path}
    try:
        with tarfile.open(mode="r:gz", **opened) as tar:
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


def download(data: "DataParams", out_dir: Path) -> Dataset:
    """The download stage: the synthetic set made from its seed, or CIFAR-10 fetched from `data.url`
    and checked against `data.md5`; written to `out_dir` with where it came from."""
    if data.source == "synthetic":
        dataset = make_synthetic(data.synthetic_train_size, data.synthetic_test_size, data.synthetic_seed)
        extra = {"synthetic_seed": data.synthetic_seed}
    else:
        # A file with no name (O_TMPFILE on Linux): the kernel frees it however the stage ends, SIGKILL
        # included (killing `dvc repro`'s group kills the stage before any clean-up could run).
        with tempfile.TemporaryFile() as tarball:
            fetch(data.url, tarball, data.md5)
            tarball.seek(0)
            dataset = read_cifar10_tarball(tarball, origin=data.url)
        extra = {"url": data.url, "md5": data.md5}
    save_dataset(dataset, out_dir, extra)
    print(f"download: {dataset.source}, {len(dataset.train)} train / {len(dataset.test)} test images -> {out_dir}/")
    return dataset
