import dataclasses
import itertools

import numpy as np
import pytest
import torch

from cifarlab.config.params import IMAGE_SIDE, parse_params
from cifarlab.data.augment import MEAN_UINT8, build_train_transform
from cifarlab.data.loaders import GlobalBatchSampler, ImageDataset
from cifarlab.data.sources import make_synthetic
from cifarlab.engine.classifier import Normalize
from cifarlab.pipeline.plots import (PREVIEW_DRAWS, PREVIEW_GAP, augmentation_preview, cell_origin, preview_indices,
                                     write_preview)
from conftest import merge


def augment_params(default_params, **override):
    return parse_params(merge(default_params, {"augment": override})).augment


def test_default_pipeline_is_pad_crop_flip_cutout(default_params):
    names = [type(t).__name__ for t in build_train_transform(augment_params(default_params)).transforms]
    assert names == ["PadIfNeeded", "RandomCrop", "HorizontalFlip", "CoarseDropout"]


def test_shape_and_dtype_are_kept(default_params):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = build_train_transform(augment_params(default_params), seed=0)(image=image)["image"]
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_cutout_fills_an_8x8_square_with_the_mean_colour(default_params):
    params = augment_params(default_params, pad=0, hflip=0.0, cutout_size=8, cutout_p=1.0)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    out = build_train_transform(params, seed=1)(image=image)["image"]
    filled = np.all(out == np.array(MEAN_UINT8, dtype=np.uint8), axis=-1)
    assert filled.sum() == 64
    rows, cols = np.nonzero(filled)
    assert (np.ptp(rows), np.ptp(cols)) == (7, 7)


def test_all_off_is_identity(default_params):
    params = augment_params(default_params, pad=0, hflip=0.0, cutout_size=0)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(build_train_transform(params)(image=image)["image"], image)


def test_augmentation_depends_only_on_seed_epoch_and_index(default_params):
    split = make_synthetic(40, 10, 0).train
    a = ImageDataset(split, build_train_transform(augment_params(default_params)), seed=5)
    b = ImageDataset(split, build_train_transform(augment_params(default_params)), seed=5)
    for index in (3, 17, 3):          # any access order gives the same image
        assert torch.equal(a[index][0], b[index][0])
    b.epoch = 1
    assert any(not torch.equal(a[i][0], b[i][0]) for i in range(10))


def test_shards_of_a_global_batch_reassemble_it():
    single = list(GlobalBatchSampler(100, 32, seed=3))
    shards = [list(GlobalBatchSampler(100, 32, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*shards)] == single
    assert sorted(i for batch in single for i in batch) == list(range(100))


def test_normalisation_is_the_single_set_of_constants():
    normalize = Normalize()
    white = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    expected = (1 - torch.tensor([0.4914, 0.4822, 0.4465])) / torch.tensor([0.2470, 0.2435, 0.2616])
    assert torch.allclose(normalize(white).flatten(), expected)


# --- the steps in words, and the train stage's preview figure -------------------------------------

@pytest.mark.parametrize("pad,hflip,cutout_size,cutout_p",
                         list(itertools.product((0, 4), (0.0, 0.5), (0, 8), (0.0, 1.0))))
def test_steps_in_words_are_the_steps_built(default_params, pad, hflip, cutout_size, cutout_p):
    params = augment_params(default_params, pad=pad, hflip=hflip, cutout_size=cutout_size, cutout_p=cutout_p)
    built = [type(t).__name__ for t in build_train_transform(params).transforms]
    words = params.steps()
    assert len(words) == (pad > 0) + (hflip > 0) + (cutout_size > 0 and cutout_p > 0)
    assert len(built) == len(words) + (pad > 0)          # pad + crop is one step in words
    assert ("crop" in " ".join(words)) == ("RandomCrop" in built)
    assert ("flip" in " ".join(words)) == ("HorizontalFlip" in built)
    assert ("cutout" in " ".join(words)) == ("CoarseDropout" in built)
    assert params.describe().startswith("none (") == (not built)


def test_an_alternating_flip_is_described_as_one(default_params):
    """The batch path's alternate_flip flips every image in every other epoch: the report must not call
    that a flip with probability hflip."""
    random_flip = augment_params(default_params, pad=2, hflip=0.5, cutout_size=0, cutout_p=0.0)
    alternating = dataclasses.replace(random_flip, alternate_flip=True, path="batch")
    assert "horizontal flip (p 0.5)" in random_flip.describe()
    assert alternating.describe() == ("pad 2 (reflect) + random 32x32 crop, then horizontal flip of each image in "
                                      "every other epoch (alternate_flip)")


def test_preview_images_are_one_per_class_first():
    labels = np.array([3, 1, 1, 0, 3, 2, 0])
    assert preview_indices(labels, 3) == [3, 1, 5]        # first of classes 0, 1, 2
    assert preview_indices(labels, 6) == [3, 1, 2, 5, 0, 4]   # every class, then the next images; by class


def _preview_png(params, seed, tmp_path, name="preview.png"):
    split = make_synthetic(60, 10, 0).train
    path = tmp_path / name
    write_preview(params, build_train_transform, split.images, split.labels, [f"class{i}" for i in range(10)], seed,
                  path)
    return path.read_bytes()


def test_preview_is_deterministic_for_a_seed(default_params, tmp_path):
    params = augment_params(default_params)
    first = _preview_png(params, 1, tmp_path)
    assert _preview_png(params, 1, tmp_path) == first            # byte for byte, as DVC hashes it
    assert _preview_png(params, 2, tmp_path) != first            # the draws follow the seed


def _images_shown(fig, columns=4):
    """The cells of the one image the preview draws, row by row, cut out where `cell_origin` puts them."""
    (ax,) = fig.axes
    (shown,) = ax.get_images()
    shown = np.asarray(shown.get_array())
    rows = (shown.shape[0] + PREVIEW_GAP) // (IMAGE_SIDE + PREVIEW_GAP)
    assert shown.shape[:2] == (rows * (IMAGE_SIDE + PREVIEW_GAP) - PREVIEW_GAP, columns * (IMAGE_SIDE + PREVIEW_GAP) - PREVIEW_GAP)
    return [[shown[y:y + IMAGE_SIDE, x:x + IMAGE_SIDE] for c in range(columns) for y, x in [cell_origin(r, c)]]
            for r in range(rows)]


def test_preview_rows_are_the_stored_images_then_draws(default_params):
    images = make_synthetic(40, 10, 0).train.images[:4]
    fig = augmentation_preview(augment_params(default_params), build_train_transform, images, ["a", "b", "c", "d"],
                               seed=1)
    rows = _images_shown(fig)
    assert len(rows) == 1 + PREVIEW_DRAWS
    assert all(np.array_equal(shown, image) for shown, image in zip(rows[0], images))
    for draw in rows[1:]:       # cutout p=1 changes every image in every draw
        assert not any(np.array_equal(shown, image) for shown, image in zip(draw, images))
    assert "Training augmentation: pad 4 (reflect)" in fig._suptitle.get_text()


def test_preview_without_augmentation_says_so_instead_of_repeating_rows(default_params):
    images = make_synthetic(40, 10, 0).train.images[:4]
    params = augment_params(default_params, pad=0, hflip=0.0, cutout_size=0)
    fig = augmentation_preview(params, build_train_transform, images, ["a", "b", "c", "d"], seed=1)
    rows = _images_shown(fig)
    assert len(rows) == 1 and all(np.array_equal(shown, image) for shown, image in zip(rows[0], images))
    title = " ".join(fig._suptitle.get_text().split())
    assert title.startswith("No training augmentation (augment.pad 0, augment.hflip 0, augment.cutout_size 0)")
    assert "as stored" in title and "draw" not in title
