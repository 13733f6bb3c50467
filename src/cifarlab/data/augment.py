"""Albumentations pipelines built from the `augment` params, and the preview the train stage draws.

They work on uint8 HWC images. Normalisation is not here: it is the model's first layer
(`cifarlab.engine.classifier.Normalize`), so train and test can never be normalised differently. Cutout fills
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
from cifarlab.config.params import AugmentParams
from cifarlab.data.storage import CIFAR_MEAN

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


PREVIEW_GAP = 6        # pixels of white between the preview's images (its mosaic is drawn in one image)


def preview_cells(params: AugmentParams, images: np.ndarray, seed: int, draws: int = PREVIEW_DRAWS) -> list[list[np.ndarray]]:
    """The preview's rows: the images as stored, then `draws` rows of the training transform applied
    to the same images, the transform seeded with `seed` (none when no augmentation is configured)."""
    transform = build_train_transform(params, seed=seed)
    rows = [list(images)]
    for _ in range(draws if params.steps() else 0):
        rows.append([transform(image=image)["image"] for image in images])
    return rows


def cell_origin(row: int, column: int) -> tuple[int, int]:
    """Top-left pixel (y, x) of a cell in the preview's mosaic."""
    return row * (IMAGE_SIZE + PREVIEW_GAP), column * (IMAGE_SIZE + PREVIEW_GAP)


def mosaic(rows: list[list[np.ndarray]]) -> np.ndarray:
    """The cells in one uint8 HWC image, PREVIEW_GAP white pixels between them."""
    height, width = (end + IMAGE_SIZE for end in cell_origin(len(rows) - 1, len(rows[0]) - 1))   # to the last cell's edge
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            y, x = cell_origin(r, c)
            out[y:y + IMAGE_SIZE, x:x + IMAGE_SIZE] = image
    return out


def augmentation_preview(params: AugmentParams, images: np.ndarray, captions: Sequence[str], seed: int,
                         draws: int = PREVIEW_DRAWS):
    """The images as stored (top row), then `draws` rows of the training transform applied to the
    same images, the transform seeded with `seed`: the same figure for the same seed and params.
    With no augmentation configured it shows the stored row once and says so.

    The cells are one image (`mosaic`) in one axes, framed and labelled around it: fifty axes under a
    layout engine took 1.7 s of every train stage (1.0 s warm), one image 0.9 s (0.15 s warm)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure   # no pyplot: no backend state in the training process
    from matplotlib.patches import Rectangle

    cells = preview_cells(params, images, seed, draws)
    rows, columns = len(cells), len(images)
    fig = Figure(figsize=(1.2 * columns + 0.5, 1.2 * rows + 1.1))
    ax = fig.add_axes((0.04, 0.02, 0.95, 1 - 1.0 / fig.get_figheight()))   # an inch above for captions and title
    ax.imshow(mosaic(cells), interpolation="nearest")
    ax.set_anchor("N")                      # the mosaic right under its captions; the save trims what is left
    ax.set_axis_off()
    frames = [Rectangle((x - 0.5, y - 0.5), IMAGE_SIZE, IMAGE_SIZE)
              for r in range(rows) for c in range(columns) for y, x in [cell_origin(r, c)]]
    ax.add_collection(PatchCollection(frames, facecolor="none", edgecolor="black", linewidth=0.8, clip_on=False))
    for column, caption in enumerate(captions):
        y, x = cell_origin(0, column)
        ax.text(x + IMAGE_SIZE / 2 - 0.5, y - 2, caption, ha="center", va="bottom", fontsize=8)
    for row in range(rows):
        y, x = cell_origin(row, 0)
        ax.text(x - 3, y + IMAGE_SIZE / 2 - 0.5, "stored" if row == 0 else f"draw {row}", rotation=90,
                ha="right", va="center", fontsize=9)
    if params.steps():
        title = (f"Training augmentation: {params.describe()}. The same {columns} training images: as stored "
                 f"(top), then {draws} random draws (seed {seed})")
    else:
        title = (f"No training augmentation ({params.switched_off()}): "
                 f"training sees these {columns} images, and every other, as stored")
    fig.suptitle("\n".join(textwrap.wrap(title, max(40, int(fig.get_figwidth() * 9)))), fontsize=10,
                 y=1 - 0.1 / fig.get_figheight())
    return fig


def write_preview(params: AugmentParams, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                  seed: int, path: Path = paths.AUGMENT_PREVIEW) -> None:
    """The train stage's preview figure of `params` on the training split (images, labels)."""
    chosen = preview_indices(labels)
    captions = [f"{classes[int(labels[i])]}\ntrain #{i}" for i in chosen]
    save_figure(augmentation_preview(params, images[chosen], captions, seed), path, dpi=110, bbox_inches="tight",
                pad_inches=0.15)
