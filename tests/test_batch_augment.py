"""The batch (on-device) augmentation path: the per-image path's amounts and semantics, computed as
one gather per batch, and each image's draw a function of (seed, epoch, index) only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifarlab.data.batch_augment import MEAN_UINT8, BatchAugment, uniform
from cifarlab.data.sources import make_synthetic
from conftest import merge

IMAGES = torch.from_numpy(make_synthetic(64, 10, seed=3).train.images).permute(0, 3, 1, 2).contiguous()
INDICES = torch.arange(len(IMAGES))


def augment(pad=0, pad_mode="reflect", hflip=0.0, cutout_size=0, cutout_p=0.0, alternate_flip=False):
    return BatchAugment(pad, pad_mode, hflip, cutout_size, cutout_p, alternate_flip)


def test_uniform_is_a_function_of_seed_epoch_index_and_stream():
    draws = uniform(1, 2, torch.arange(10_000), 0)
    assert torch.equal(draws, uniform(1, 2, torch.arange(10_000), 0))
    assert 0.0 <= draws.min() and draws.max() < 1.0
    assert abs(draws.mean().item() - 0.5) < 0.02 and abs(draws.std().item() - 0.2887) < 0.01   # uniform
    for other in (uniform(2, 2, torch.arange(10_000), 0), uniform(1, 3, torch.arange(10_000), 0),
                  uniform(1, 2, torch.arange(10_000), 1)):
        assert (other != draws).float().mean() > 0.99


def test_uniform_draws_stay_what_they_were():
    """Pinned draws (made while the key was still mixed on the device): where the key is mixed must not
    change any image's augmentation, or a resumed run would see other batches than it started with."""
    indices = torch.tensor([0, 1, 7, 49999, 123456789])
    expected = {(1, 2, 0): [0.4123714566230774, 0.1534571647644043, 0.4974924325942993, 0.03031468391418457,
                            0.09292566776275635],
                (12345, 11, 5): [0.3442152738571167, 0.4279314875602722, 0.9315598607063293, 0.017709672451019287,
                                 0.9816768765449524]}
    for (seed, epoch, stream), values in expected.items():
        assert uniform(seed, epoch, indices, stream).tolist() == values


def test_no_augmentation_is_the_identity():
    assert torch.equal(augment()(IMAGES, INDICES, seed=0, epoch=0), IMAGES)


def test_an_image_draw_does_not_depend_on_its_batch():
    aug = augment(pad=4, hflip=0.5, cutout_size=8, cutout_p=0.5)
    whole = aug(IMAGES, INDICES, seed=5, epoch=2)
    order = torch.randperm(len(IMAGES), generator=torch.Generator().manual_seed(0))
    shuffled = aug(IMAGES[order][:7], INDICES[order][:7], seed=5, epoch=2)
    assert torch.equal(shuffled, whole[order][:7])
    assert not torch.equal(whole, aug(IMAGES, INDICES, seed=5, epoch=3))   # a new epoch, new draws


@pytest.mark.parametrize("pad_mode,numpy_mode", [("reflect", "reflect"), ("constant", "constant")])
def test_translation_is_a_crop_of_the_padded_image(pad_mode, numpy_mode):
    """Reflect is reflect-101 (cv2.BORDER_REFLECT_101, numpy's 'reflect'), as on the per-image path;
    constant pads with the mean colour. Every shift in [-pad, pad] occurs."""
    pad = 2
    out = augment(pad=pad, pad_mode=pad_mode)(IMAGES, INDICES, seed=1, epoch=0).numpy()
    shifts = set()
    for image, result in zip(IMAGES.numpy(), out):
        if numpy_mode == "constant":
            padded = np.stack([np.pad(c, pad, constant_values=m) for c, m in zip(image, MEAN_UINT8)])
        else:
            padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        found = [(y, x) for y in range(2 * pad + 1) for x in range(2 * pad + 1)
                 if np.array_equal(padded[:, y:y + 32, x:x + 32], result)]
        assert found, "not a crop of the padded image"
        shifts.add(found[0])
    assert len(shifts) >= 20   # 25 possible shifts, 64 images


def test_flip_mirrors_about_half_the_images():
    out = augment(hflip=0.5)(IMAGES, INDICES, seed=1, epoch=0)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, IMAGES)]
    kept = [torch.equal(o, i) for o, i in zip(out, IMAGES)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 20 <= sum(flipped) <= 44


def test_alternating_flip_shows_every_image_both_ways_over_two_epochs():
    aug = augment(hflip=0.5, alternate_flip=True)
    even = aug(IMAGES, INDICES, seed=1, epoch=4)
    odd = aug(IMAGES, INDICES, seed=1, epoch=5)
    for a, b, image in zip(even, odd, IMAGES):
        assert {torch.equal(a, image), torch.equal(b, image)} == {True, False}
    assert torch.equal(even, aug(IMAGES, INDICES, seed=1, epoch=0))


def test_cutout_fills_one_square_inside_the_image_with_the_mean_colour():
    side = 8
    out = augment(cutout_size=side, cutout_p=1.0)(IMAGES, INDICES, seed=1, epoch=0)
    fill = torch.tensor(MEAN_UINT8, dtype=torch.uint8).view(3, 1, 1)
    for image, result in zip(IMAGES, out):
        changed = (result != image).any(0)
        hole = (result == fill).all(0)
        ys, xs = torch.nonzero(hole & changed, as_tuple=True)
        assert changed.sum() > 0 and bool((hole | ~changed).all())   # every changed pixel is the fill
        # the changed pixels lie in one side x side square inside the image
        assert ys.max() - ys.min() < side and xs.max() - xs.min() < side
    none = augment(cutout_size=side, cutout_p=0.0)(IMAGES, INDICES, seed=1, epoch=0)
    assert torch.equal(none, IMAGES)


def test_from_params_takes_the_augment_section(default_params):
    from cifarlab.config.params import parse_params

    params = parse_params(merge(default_params, {"augment": {"path": "batch", "alternate_flip": True}})).augment
    aug = BatchAugment.from_params(params)
    assert (aug.pad, aug.pad_mode, aug.hflip, aug.cutout_size, aug.cutout_p, aug.alternate_flip) == (
        params.pad, params.pad_mode, params.hflip, params.cutout_size, params.cutout_p, True)


def test_device_loader_gives_the_per_image_paths_batches_augmented_on_the_device(default_params):
    """Same global batches as the worker loader for (seed, epoch); each batch is the gathered images
    through BatchAugment; an epoch is reproducible and the next one differs."""
    from cifarlab.data.loaders import DeviceBatchLoader, EpochLoader, ImageDataset, augment_path, train_loader
    from cifarlab.config.params import parse_params
    from cifarlab.engine.runtime import Runtime

    split = make_synthetic(100, 10, seed=1).train
    params = parse_params(merge(default_params, {"augment": {"path": "batch", "alternate_flip": True}})).augment
    runtime = Runtime(torch.device("cpu"), "fp32", False, 0)
    loader = train_loader(split, params, 32, seed=7, runtime=runtime)
    assert isinstance(loader, DeviceBatchLoader) and len(loader) == 4 and len(loader.epoch(1)) == 4
    plain = EpochLoader(ImageDataset(split), 32, seed=7, num_workers=0, pin_memory=False)
    aug = BatchAugment.from_params(params)
    for (images, labels), (raw, raw_labels) in zip(loader.epoch(3), plain.epoch(3)):
        assert torch.equal(labels, raw_labels)
        indices = torch.tensor([int(np.flatnonzero((split.images == r.permute(1, 2, 0).numpy()).all((1, 2, 3)))[0])
                                for r in raw])
        assert torch.equal(images, aug(raw, indices, 7, 3))
    first = [b[0] for b in loader.epoch(2)]
    assert all(torch.equal(a, b[0]) for a, b in zip(first, loader.epoch(2)))
    assert not all(torch.equal(a, b[0]) for a, b in zip(first, loader.epoch(3)))
    assert augment_path(params, runtime) == ("batch", "augment.path")
    auto = parse_params(merge(default_params, {"augment": {"path": "auto"}})).augment
    assert augment_path(auto, runtime)[0] == "per_image"
    assert augment_path(auto, Runtime(torch.device("cuda"), "bf16", True, 0))[0] == "batch"


def test_alternate_flip_needs_the_batch_path(default_params):
    from cifarlab.config.params import ParamsError, parse_params

    with pytest.raises(ParamsError, match=r"`augment.alternate_flip` is true; allowed only with augment.path batch"):
        parse_params(merge(default_params, {"augment": {"alternate_flip": True}}))
