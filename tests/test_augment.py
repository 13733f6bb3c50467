import numpy as np
import torch

from cifarlab.augment import MEAN_UINT8, build_train_transform
from cifarlab.loaders import GlobalBatchSampler, ImageDataset
from cifarlab.models.classifier import Normalize
from cifarlab.params import parse_params
from cifarlab.sources import make_synthetic
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
