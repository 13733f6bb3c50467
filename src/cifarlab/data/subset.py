"""A small, class-balanced, deterministic subset of the data: what `data.train_subset` and
`data.test_subset` select (0 = the whole split), e.g. for the quick budget (conf/budget/quick.yaml).

The subset is taken where the stages load `data/`, not where the download stage writes it: `data/`
keeps the whole splits (whose sizes are checked on load), so switching budgets never fetches
CIFAR-10 again, and the same rule applies to either source. Each class gives `size // classes`
images (the first `size % classes` classes one more), drawn by a permutation of that class's
images with a fixed seed per class, and the subset keeps the split's order. So the same size always
gives the same images whatever `train.seed` is, and a larger subset contains a smaller one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifarlab.config.params import ParamsError
from cifarlab.data.storage import Dataset, Split, load_dataset

SUBSET_SEED = 0   # fixed: the subset is a property of the data and its size, not of a run's seed


def balanced_indices(labels: np.ndarray, size: int, num_classes: int, key: str = "size") -> np.ndarray:
    """Sorted indices of `size` images, as equal a number from each class as `size` allows.

    `key` names the params key the size came from, for the one-line error when the split cannot
    give it (fewer than one image per class asked for, or more images of a class than it holds)."""
    counts = np.bincount(labels, minlength=num_classes)
    per_class, extra = divmod(size, num_classes)
    quotas = [per_class + (1 if c < extra else 0) for c in range(num_classes)]
    short = [c for c in range(num_classes) if counts[c] < quotas[c]]
    if size < num_classes or short:
        most = num_classes * int(counts.min()) if len(counts) else 0
        raise ParamsError(f"params key `{key}` is {size}; allowed: 0 (the whole split) or {num_classes}..{most} "
                          f"(at least one image of each of the {num_classes} classes, at most as many of each as "
                          f"the split's smallest class holds, {int(counts.min())})")
    chosen = [np.random.default_rng([SUBSET_SEED, c]).permutation(np.flatnonzero(labels == c))[:quotas[c]]
              for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def take(split: Split, size: int, num_classes: int, key: str) -> Split:
    """`split` itself when `size` is 0, else its class-balanced subset of `size` images."""
    if size == 0:
        return split
    indices = balanced_indices(split.labels, size, num_classes, key)
    return Split(split.images[indices], split.labels[indices])


def load_subset(data_dir: str | Path, train: int = 0, test: int = 0) -> Dataset:
    """`data_dir` as the download stage wrote it (checked by `load_dataset`), each split cut to the
    given size (`data.train_subset`, `data.test_subset`; 0 = the whole split)."""
    dataset = load_dataset(data_dir)
    classes = len(dataset.classes)
    return Dataset(take(dataset.train, train, classes, "data.train_subset"),
                   take(dataset.test, test, classes, "data.test_subset"), dataset.classes, dataset.source)
