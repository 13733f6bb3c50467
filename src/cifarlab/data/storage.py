"""CIFAR-10 as this project stores it: the in-memory `Dataset` and the `data/` folder.

The dataset lives under `data/` as two uncompressed .npz files of uint8 arrays (images
[N, 32, 32, 3] HWC, labels [N]) plus `meta.json` (source, class names, sizes). `load_dataset`
checks every file is what the download stage wrote. The normalisation constants are defined here
once; `models.classifier.Normalize` applies them inside the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from cifarlab.atomic import atomic_dir
from cifarlab.config.params import IMAGE_SIDE
from cifarlab.errors import CifarlabError

# Per-channel statistics of the CIFAR-10 training split (pixel values scaled to [0, 1]).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_TRAIN_SIZE = 50_000
CIFAR10_TEST_SIZE = 10_000
NUM_CLASSES = 10

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
