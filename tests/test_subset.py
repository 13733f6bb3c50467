"""data.train_subset / data.test_subset: class-balanced, deterministic subsets taken where the stages load data/."""

from __future__ import annotations

import numpy as np
import pytest

from cifarlab.config.params import ParamsError
from cifarlab.data.sources import make_synthetic
from cifarlab.data.storage import save_dataset
from cifarlab.data.subset import balanced_indices, load_subset

CLASSES = 10


def cifar_like_labels() -> np.ndarray:
    """50,000 labels, 5,000 per class, shuffled: the shape of CIFAR-10's training split."""
    labels = np.arange(50_000) % CLASSES
    np.random.default_rng(123).shuffle(labels)
    return labels


@pytest.mark.parametrize("size", [10, 400, 1000, 1003])
def test_subset_is_class_balanced_sorted_and_unique(size):
    labels = cifar_like_labels()
    indices = balanced_indices(labels, size, CLASSES)
    counts = np.bincount(labels[indices], minlength=CLASSES)
    assert len(indices) == size and len(np.unique(indices)) == size
    assert list(indices) == sorted(indices)                   # the split's order is kept
    assert counts.max() - counts.min() <= 1                    # balanced; the remainder goes to the first classes
    assert list(counts) == [size // CLASSES + (c < size % CLASSES) for c in range(CLASSES)]


def test_subset_is_the_same_every_time_whatever_the_global_rng():
    labels = cifar_like_labels()
    np.random.seed(1)
    first = balanced_indices(labels, 400, CLASSES)
    np.random.seed(2)
    np.random.default_rng(3).random(10)
    assert np.array_equal(first, balanced_indices(labels, 400, CLASSES))


def test_a_larger_subset_contains_a_smaller_one():
    labels = cifar_like_labels()
    assert set(balanced_indices(labels, 200, CLASSES)) <= set(balanced_indices(labels, 1000, CLASSES))


def test_subset_is_not_just_the_first_images_of_each_class():
    labels = cifar_like_labels()
    indices = balanced_indices(labels, 100, CLASSES)
    firsts = np.concatenate([np.flatnonzero(labels == c)[:10] for c in range(CLASSES)])
    assert not np.array_equal(np.sort(firsts), indices)


@pytest.mark.parametrize("size", [5, 50_001])
def test_a_size_the_split_cannot_give_is_one_line_naming_the_key(size):
    with pytest.raises(ParamsError) as err:
        balanced_indices(cifar_like_labels(), size, CLASSES, key="data.train_subset")
    text = str(err.value)
    assert "\n" not in text
    assert f"params key `data.train_subset` is {size}; allowed: 0 (the whole split) or 10..50000" in text


def test_an_unbalanced_split_allows_only_what_its_smallest_class_gives():
    labels = np.array([0] * 30 + [1] * 5)
    assert len(balanced_indices(labels, 10, 2)) == 10
    with pytest.raises(ParamsError, match=r"allowed: 0 \(the whole split\) or 2\.\.10 .*smallest class holds, 5\)"):
        balanced_indices(labels, 12, 2, key="data.test_subset")


def test_load_subset_cuts_each_split_and_keeps_the_rest(tmp_path):
    dataset = make_synthetic(300, 100, seed=0)
    save_dataset(dataset, tmp_path / "data")
    whole = load_subset(tmp_path / "data")
    assert (len(whole.train), len(whole.test)) == (300, 100)
    cut = load_subset(tmp_path / "data", train=50, test=20)
    assert (len(cut.train), len(cut.test)) == (50, 20)
    assert (cut.classes, cut.source) == (dataset.classes, "synthetic")
    indices = balanced_indices(dataset.train.labels, 50, CLASSES)
    assert np.array_equal(cut.train.images, dataset.train.images[indices])
    assert np.array_equal(cut.train.labels, dataset.train.labels[indices])
    assert np.bincount(cut.test.labels, minlength=CLASSES).tolist() == [2] * CLASSES
    only_test = load_subset(tmp_path / "data", test=20)
    assert len(only_test.train) == 300 and np.array_equal(only_test.test.images, cut.test.images)


def test_load_subset_names_the_key_when_the_data_is_too_small(tmp_path):
    save_dataset(make_synthetic(300, 100, seed=0), tmp_path / "data")
    with pytest.raises(ParamsError, match=r"`data.test_subset` is 200; allowed: 0 \(the whole split\) or 10\.\.100"):
        load_subset(tmp_path / "data", test=200)
