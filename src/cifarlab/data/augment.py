"""Albumentations pipelines built from the `augment` params (the train stage's preview of them is
`cifarlab.pipeline.plots.write_preview`).

They work on uint8 HWC images. Normalisation is not here: it is the model's first layer
(`cifarlab.engine.classifier.Normalize`), so train and test can never be normalised differently. Cutout fills
with the dataset mean colour, which is zero after normalisation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from cifarlab.config.params import IMAGE_SIDE, AugmentParams
from cifarlab.data.storage import CIFAR_MEAN

if TYPE_CHECKING:
    import albumentations as A

MEAN_UINT8 = tuple(round(m * 255) for m in CIFAR_MEAN)


def build_train_transform(params: AugmentParams, seed: Optional[int] = None) -> A.Compose:
    """pad -> random 32x32 crop -> horizontal flip -> cutout, each skipped when its knob is 0
    (`AugmentParams.steps` says the same in words). Albumentations (and OpenCV) are imported here, by
    the runs that augment per image: importing them costs each stage process about a second."""
    import albumentations as A
    import cv2

    steps: list[A.BasicTransform] = []
    if params.crops:
        border = cv2.BORDER_REFLECT_101 if params.pad_mode == "reflect" else cv2.BORDER_CONSTANT
        size = IMAGE_SIDE + 2 * params.pad
        steps += [A.PadIfNeeded(size, size, border_mode=border, fill=MEAN_UINT8),
                  A.RandomCrop(IMAGE_SIDE, IMAGE_SIDE)]
    if params.flips:
        steps.append(A.HorizontalFlip(p=params.hflip))
    if params.cuts_out:
        side = (params.cutout_size, params.cutout_size)
        steps.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=side, hole_width_range=side,
                                     fill=MEAN_UINT8, p=params.cutout_p))
    return A.Compose(steps, seed=seed)
