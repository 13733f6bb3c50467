"""The augmentation of `augment.*` applied to a whole batch at once, on whatever device holds it.

The per-image path (`augment.build_train_transform`, albumentations in DataLoader workers) costs
CPU time per image; a fast network on a GPU would wait for it. Here one batch of uint8 images
[B, 3, H, W] is translated (pad + random crop), flipped and cut out with a handful of tensor ops:
every output pixel is a gather from the input at a computed source position, so the batch never
leaves its device and no padded copy is made.

Same amounts and semantics as the per-image path: translation by up to `pad` pixels with
reflect-101 (`reflect`) or mean-colour (`constant`) borders, a horizontal flip with probability
`hflip`, and with probability `cutout_p` one `cutout_size` square lying inside the image filled
with the dataset mean colour. `alternate_flip` (airbench's alternating flip: Jordan 2024,
"94% on CIFAR-10 in 3.29 seconds on a single GPU", section 3.6) flips each image on every other
epoch instead of at random, so over two epochs every image is seen both ways.

Every random draw is a hash of (seed, epoch, image index, draw): an image's augmentation depends
on nothing else (not on the batch it lands in, the batch size, the device, or other processes),
as on the per-image path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from cifarlab.config.params import AugmentParams
from cifarlab.data.storage import CIFAR_MEAN

MEAN_UINT8 = tuple(round(m * 255) for m in CIFAR_MEAN)

# Which hash stream each random draw of an image reads.
_DY, _DX, _FLIP, _CUT, _CUT_Y, _CUT_X = range(6)
_MASK63 = (1 << 63) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit finaliser (xorshift-multiply, as in splitmix64) on int64 tensors, kept non-negative
    so right shifts are logical; wrapping multiplication is the same on every device."""
    x = x & _MASK63
    x = ((x ^ (x >> 31)) * 0x5851F42D4C957F2D) & _MASK63
    x = ((x ^ (x >> 29)) * 0x14057B7EF767814F) & _MASK63
    return x ^ (x >> 32)


def uniform(seed: int, epoch: int, indices: torch.Tensor, stream: int) -> torch.Tensor:
    """A float in [0, 1) per index, a pure function of (seed, epoch, index, stream)."""
    key = ((seed * 1_000_003 + epoch) * 8 + stream) & _MASK63
    # The key is mixed on the host (`_mix` is the same on Python ints): a key tensor made on a GPU would be a
    # copy from the host that waits for every step queued before it, once per draw.
    x = _mix(indices.to(torch.int64) * 0x2545F4914F6CDD1D + _mix(key))
    return (x & ((1 << 24) - 1)).to(torch.float32) / float(1 << 24)


def _reflect(position: torch.Tensor, size: int) -> torch.Tensor:
    """Source index for `position` with reflect-101 borders (…2 1 | 0 1 2 … n-1 | n-2 …)."""
    period = 2 * (size - 1)
    position = position.remainder(period)
    return torch.where(position >= size, period - position, position)


@functools.lru_cache(maxsize=None)
def _fill(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The mean colour [1, C, 1, 1] on `device`, made once per device (each copy to a GPU waits for it)."""
    return torch.tensor(MEAN_UINT8[:channels], dtype=dtype, device=device).view(1, channels, 1, 1)


@dataclass(frozen=True)
class BatchAugment:
    pad: int
    pad_mode: str            # reflect | constant
    hflip: float
    cutout_size: int
    cutout_p: float
    alternate_flip: bool = False

    @classmethod
    def from_params(cls, params: AugmentParams) -> "BatchAugment":
        return cls(params.pad, params.pad_mode, params.hflip, params.cutout_size, params.cutout_p,
                   params.alternate_flip)

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        """Augmented copy of uint8 `images` [B, C, H, W]; `indices` [B] are the images' split indices."""
        batch, channels, height, width = images.shape
        device = images.device
        indices = indices.to(device)
        rows = torch.arange(height, device=device).expand(batch, height)
        cols = torch.arange(width, device=device).expand(batch, width)
        if self.pad > 0:
            span = 2 * self.pad + 1
            dy = (uniform(seed, epoch, indices, _DY) * span).long() - self.pad
            dx = (uniform(seed, epoch, indices, _DX) * span).long() - self.pad
            rows, cols = rows + dy[:, None], cols + dx[:, None]
        if self.hflip > 0:
            if self.alternate_flip:
                flip = (uniform(seed, 0, indices, _FLIP) < self.hflip) ^ bool(epoch % 2)
            else:
                flip = uniform(seed, epoch, indices, _FLIP) < self.hflip
            cols = torch.where(flip[:, None], width - 1 - cols, cols)
        outside = None
        if self.pad > 0 and self.pad_mode == "constant":
            outside = (((rows < 0) | (rows >= height))[:, :, None] | ((cols < 0) | (cols >= width))[:, None, :])
            rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
        elif self.pad > 0:
            rows, cols = _reflect(rows, height), _reflect(cols, width)
        out = images[torch.arange(batch, device=device)[:, None, None, None],
                     torch.arange(channels, device=device)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
        if outside is not None:
            out = torch.where(outside[:, None], _fill(channels, images.dtype, device), out)
        if self.cutout_size > 0 and self.cutout_p > 0:
            side = min(self.cutout_size, height, width)
            apply = uniform(seed, epoch, indices, _CUT) < self.cutout_p
            top = (uniform(seed, epoch, indices, _CUT_Y) * (height - side + 1)).long()
            left = (uniform(seed, epoch, indices, _CUT_X) * (width - side + 1)).long()
            y = torch.arange(height, device=device)[None, :]
            x = torch.arange(width, device=device)[None, :]
            in_rows = (y >= top[:, None]) & (y < top[:, None] + side)
            in_cols = (x >= left[:, None]) & (x < left[:, None] + side)
            hole = (in_rows[:, :, None] & in_cols[:, None, :]) & apply[:, None, None]
            out = torch.where(hole[:, None], _fill(channels, images.dtype, device), out)
        return out
