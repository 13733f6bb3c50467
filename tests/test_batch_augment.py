"""The batch (on-device) augmentation path: the per-image path's amounts and semantics, computed as
one gather per batch, and each image's draw a function of (seed, epoch, index) only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifarlab.batch_augment import MEAN_UINT8, BatchAugment, uniform
from cifarlab.sources import make_synthetic

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
    from cifarlab.params import parse_params

    params = parse_params(default_params).augment
    aug = BatchAugment.from_params(params, alternate_flip=True)
    assert (aug.pad, aug.pad_mode, aug.hflip, aug.cutout_size, aug.cutout_p, aug.alternate_flip) == (
        params.pad, params.pad_mode, params.hflip, params.cutout_size, params.cutout_p, True)
