"""Albumentations pipelines built from the `augment` params, and the preview the train stage draws.

They work on uint8 HWC images. Normalisation is not here: it is the model's first layer
(`cifarlab.models.classifier.Normalize`), so train and test can never be normalised differently. Cutout fills
with the dataset mean colour, which is zero after normalisation.
"""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import albumentations as A
import cv2
import numpy as np

from cifarlab import paths
from cifarlab.atomic import save_figure
from cifarlab.params import AugmentParams
from cifarlab.storage import CIFAR_MEAN

MEAN_UINT8 = tuple(round(m * 255) for m in CIFAR_MEAN)
IMAGE_SIZE = 32
PREVIEW_IMAGES = 10    # training images in the preview, one per class while classes last
PREVIEW_DRAWS = 4      # rows of random draws below the stored images


def build_train_transform(params: AugmentParams, seed: Optional[int] = None) -> A.Compose:
    """pad -> random 32x32 crop -> horizontal flip -> cutout, each skipped when its knob is 0
    (`AugmentParams.steps` says the same in words)."""
    steps: list[A.BasicTransform] = []
    if params.crops:
        border = cv2.BORDER_REFLECT_101 if params.pad_mode == "reflect" else cv2.BORDER_CONSTANT
        size = IMAGE_SIZE + 2 * params.pad
        steps += [A.PadIfNeeded(size, size, border_mode=border, fill=MEAN_UINT8),
                  A.RandomCrop(IMAGE_SIZE, IMAGE_SIZE)]
    if params.flips:
        steps.append(A.HorizontalFlip(p=params.hflip))
    if params.cuts_out:
        side = (params.cutout_size, params.cutout_size)
        steps.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=side, hole_width_range=side,
                                     fill=MEAN_UINT8, p=params.cutout_p))
    return A.Compose(steps, seed=seed)


# --- the preview --------------------------------------------------------------------------------

def preview_indices(labels: np.ndarray, count: int = PREVIEW_IMAGES) -> list[int]:
    """The first training image of each class in class order, then the next images in split order,
    up to `count`: the same images for the same split, whatever the params."""
    labels = np.asarray(labels)
    chosen = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:count]
    chosen += list(itertools.islice((i for i in range(len(labels)) if i not in chosen), count - len(chosen)))
    return sorted(chosen, key=lambda i: (int(labels[i]), i))


def augmentation_preview(params: AugmentParams, images: np.ndarray, captions: Sequence[str], seed: int,
                         draws: int = PREVIEW_DRAWS):
    """The images as stored (top row), then `draws` rows of the training transform applied to the
    same images, the transform seeded with `seed`: the same figure for the same seed and params.
    With no augmentation configured it shows the stored row once and says so."""
    from matplotlib.figure import Figure   # no pyplot: no backend state in the training process

    steps = params.steps()
    rows = 1 + (draws if steps else 0)
    columns = len(images)
    fig = Figure(figsize=(1.2 * columns + 0.9, 1.3 * rows + 1.1), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    transform = build_train_transform(params, seed=seed)
    for row in range(rows):
        for column, image in enumerate(images):
            ax = axes[row, column]
            ax.imshow(image if row == 0 else transform(image=image)["image"], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(captions[column], fontsize=8)
        axes[row, 0].set_ylabel("stored" if row == 0 else f"draw {row}", fontsize=9)
    if steps:
        title = (f"Training augmentation: {params.describe()}. The same {columns} training images: as stored "
                 f"(top), then {draws} random draws (seed {seed})")
    else:
        title = (f"No training augmentation ({params.switched_off()}): "
                 f"training sees these {columns} images, and every other, as stored")
    fig.suptitle("\n".join(textwrap.wrap(title, max(40, int(fig.get_figwidth() * 9)))), fontsize=10)
    return fig


def write_preview(params: AugmentParams, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                  seed: int, path: Path = paths.AUGMENT_PREVIEW) -> None:
    """The train stage's preview figure of `params` on the training split (images, labels)."""
    chosen = preview_indices(labels)
    captions = [f"{classes[int(labels[i])]}\ntrain #{i}" for i in chosen]
    save_figure(augmentation_preview(params, images[chosen], captions, seed), path, dpi=110)
