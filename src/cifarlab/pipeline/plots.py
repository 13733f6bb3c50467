"""Matplotlib figures for the stages and the report. Each function returns a Figure; the caller
saves it with `cifarlab.atomic.save_figure`. The one exception is the train stage's augmentation
preview: `write_preview` picks its images and saves it."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cifarlab import paths  # noqa: E402
from cifarlab.atomic import save_figure  # noqa: E402
from cifarlab.config.params import IMAGE_SIDE, AugmentParams  # noqa: E402


def lr_find_figure(lrs: Sequence[float], losses: Sequence[float], candidates: Mapping[str, float], rule: str,
                   loss_minimum: float, window: Sequence[float], trained_lr: float, trained_from_find: bool,
                   minimum_at_end: bool = False):
    """The range-test curve with the window the rules read shaded, every rule's suggestion marked
    (`rule` is lr_find.rule's), and the max LR training used, the one thick line: "chosen". With
    `minimum_at_end` the lowest point is the sweep's last (the loss still falls there), and says so."""
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.axvspan(window[0], window[1], color="tab:green", alpha=0.08,
               label=f"window the rules read: {window[0]:.1e} .. {window[1]:.1e}")
    ax.plot(lrs, losses, color="tab:blue", label="smoothed training loss")
    colours = dict(zip(candidates, ("tab:green", "tab:orange", "tab:purple", "tab:brown")))
    for name, lr in candidates.items():
        ax.axvline(lr, color=colours[name], linewidth=1.2, linestyle="--",
                   label=f"{name}: {lr:.2e}" + ("  (lr_find.rule)" if name == rule else ""))
    ax.axvline(loss_minimum, color="tab:red", linestyle=":",
               label=f"lowest point: {loss_minimum:.2e}, the sweep's end (still falling)" if minimum_at_end
               else f"loss minimum: {loss_minimum:.2e} (never used)")
    where = "above" if trained_lr > loss_minimum else "below" if trained_lr < loss_minimum else "at"
    source = (f"lr_find's {rule}" if trained_from_find else
              f"set in train.max_lr, {where} the {'lowest point' if minimum_at_end else 'loss minimum'}")
    ax.axvline(trained_lr, color="black", linewidth=3, alpha=0.6,
               label=f"chosen: max LR used for training {trained_lr:.2e} ({source})")
    ax.set_xscale("log")
    finite = np.asarray([x for x in losses if np.isfinite(x)])
    if len(finite):
        ax.set_ylim(finite.min() - 0.05 * abs(finite.min()), min(finite.max(), 4 * finite.min()) * 1.05)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("smoothed loss")
    ax.set_title("LR range test")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def schedule_figure(lrs: Sequence[float], steps_per_epoch: int, max_at_epoch: int):
    """The LR of every batch, placed at the point of training that batch completes (batch k of
    epoch e at e - 1 + k / steps_per_epoch), so the peak at the last batch of `max_at_epoch` sits
    exactly on that epoch's mark."""
    fig, ax = plt.subplots(figsize=(8, 4))
    epochs = (np.arange(len(lrs)) + 1) / steps_per_epoch
    ax.plot(epochs, lrs, color="tab:blue", marker="." if len(lrs) <= 60 else None, label="LR of the batch")
    ax.axvline(max_at_epoch, color="tab:gray", linestyle="--", label=f"end of epoch {max_at_epoch} (peak)")
    ax.set_xlim(0, len(lrs) / steps_per_epoch)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs completed")
    ax.set_ylabel("learning rate")
    ax.set_title(f"OneCycle LR per batch ({len(lrs)} steps, {steps_per_epoch} per epoch)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def curves_figure(history: Mapping[str, Sequence[float]], target_accuracy: Optional[float] = None,
                  train_augmented: Optional[bool] = None):
    """Loss and accuracy per epoch, train (measured while training) and test side by side. The train
    legend says "augmented" or "not augmented" only when told which (`train_augmented`)."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    how = {True: "augmented, ", False: "not augmented, ", None: ""}[train_augmented]
    labels = {"train": f"train ({how}during the epoch)", "test": "test (after the epoch)"}
    for split, style in (("train", "-o"), ("test", "-s")):
        epochs = np.arange(1, len(history[f"{split}/loss"]) + 1)
        loss_ax.plot(epochs, history[f"{split}/loss"], style, markersize=3, label=labels[split])
        acc_ax.plot(epochs, 100 * np.asarray(history[f"{split}/accuracy"]), style, markersize=3, label=labels[split])
    if target_accuracy is not None:
        acc_ax.axhline(100 * target_accuracy, color="tab:red", linestyle="--", linewidth=1,
                       label=f"target {100 * target_accuracy:.0f}%")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss per epoch")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy per epoch")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(matrix: np.ndarray, classes: Sequence[str]):
    """Counts with row-normalised colour: row = true class, column = predicted class."""
    rows = matrix.sum(axis=1, keepdims=True)
    share = matrix / np.maximum(rows, 1)
    fig, ax = plt.subplots(figsize=(8, 7))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (test split; colour = share of the true class)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def lr_find_not_run_figure(trained_lr: float):
    """In place of the range test's curve when nothing used it (a numeric train.max_lr)."""
    return _empty_figure("LR range test: not run", f"train.max_lr is a number ({trained_lr:.2e}): nothing uses "
                         f"the range test\nset lr_find.when: always to run it anyway")


def _empty_figure(title: str, message: str):
    fig, ax = plt.subplots(figsize=(7, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.45, message, ha="center", va="center", fontsize=11)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def gallery_figure(images: np.ndarray, titles: Sequence[str], title: str, columns: int = 5,
                   empty_message: str = "none"):
    """A grid of uint8 HWC images with a caption each."""
    if len(images) == 0:
        return _empty_figure(title, empty_message)
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.7 * rows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, titles):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=8)
    _wrapped_suptitle(fig, title)
    return fig


def _wrapped_suptitle(fig, title: str) -> None:
    """A figure title broken into lines that fit the figure: a figure of two images is narrower
    than its one-line title, which was cut at both edges."""
    chars = max(24, int(fig.get_figwidth() * 8.5))   # about 8.5 characters per inch at 12 pt
    fig.suptitle("\n".join(textwrap.wrap(title, chars)) or title)


ZERO_STUB = 0.8   # percentage points: the width drawn for a class at 0%, so its bar is visible


def per_class_figure(accuracy: Mapping[str, float], overall: float, title: str):
    """Horizontal bars of per-class accuracy (%), the overall accuracy as a line. A class at 0% gets a
    thin red stub, so its bar still shows beside its label."""
    names = list(accuracy)
    values = 100 * np.asarray([accuracy[name] for name in names])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.6))
    ys = np.arange(len(names))
    ax.barh(ys, np.maximum(values, ZERO_STUB), height=0.7,
            color=["tab:red" if v < 100 * overall or v == 0 else "tab:blue" for v in values])
    for y, value in zip(ys, values):
        ax.text(value + 1, y, f"{value:.1f}%", va="center", fontsize=8)
    ax.axvline(100 * overall, color="black", linestyle="--", linewidth=1)
    ax.text(100 * overall, -0.75, f"overall {100 * overall:.2f}%", ha="center", va="center", fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.set_yticks(ys, names)
    ax.set_ylim(len(names) - 0.5, -1.1)     # top to bottom in class order, a strip above for the label
    ax.set_xlim(0, 110)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("test accuracy (%)   red: below the overall accuracy, or 0%")
    ax.set_ylabel("true class")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def gradcam_figure(images: np.ndarray, predicted_cams: np.ndarray, true_cams: np.ndarray,
                   captions: Sequence[str], predicted_names: Sequence[str], true_names: Sequence[str],
                   title: str, columns: int = 5, empty_message: str = "none"):
    """Per image, a column of three: the image, Grad-CAM for the predicted class, Grad-CAM for the
    true class (heat maps in [0, 1] overlaid on the image). Images wrap into blocks of `columns`."""
    count = len(images)
    if count == 0:
        return _empty_figure(title, empty_message)
    columns = min(columns, count)
    blocks = -(-count // columns)
    fig, axes = plt.subplots(3 * blocks, columns, figsize=(2.2 * columns + 0.8, 7.2 * blocks + 0.4),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i in range(count):
        block, column = divmod(i, columns)
        image_ax, pred_ax, true_ax = (axes[3 * block + r, column] for r in range(3))
        image_ax.imshow(images[i], interpolation="nearest")
        image_ax.set_title(captions[i], fontsize=8)
        for ax, cams, label in ((pred_ax, predicted_cams, f"CAM of predicted\n{predicted_names[i]}"),
                                (true_ax, true_cams, f"CAM of true\n{true_names[i]}")):
            ax.imshow(images[i], interpolation="nearest")
            ax.imshow(cams[i], cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear",
                      extent=(-0.5, images.shape[2] - 0.5, images.shape[1] - 0.5, -0.5))
            ax.set_title(label, fontsize=8)
    scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap="jet")
    fig.colorbar(scale, ax=axes, shrink=min(0.5, 1.5 / blocks),
                 label="Grad-CAM, overlaid at 50% (1 = most evidence for the class)")
    _wrapped_suptitle(fig, title)
    return fig


# --- the train stage's augmentation preview -------------------------------------------------------

PREVIEW_IMAGES = 10    # training images in the preview, one per class while classes last
PREVIEW_DRAWS = 4      # rows of random draws below the stored images
PREVIEW_GAP = 6        # pixels of white between the preview's images (its mosaic is drawn in one image)

# `cifarlab.data.augment.build_train_transform`: passed in rather than imported, so that the stages
# that draw only the other figures (evaluate, report) neither import albumentations nor depend on it.
BuildTransform = Callable[[AugmentParams, int], Callable[..., dict]]


def preview_indices(labels: np.ndarray, count: int = PREVIEW_IMAGES) -> list[int]:
    """The first training image of each class in class order, then the next images in split order,
    up to `count`: the same images for the same split, whatever the params."""
    labels = np.asarray(labels)
    chosen = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:count]
    chosen += list(itertools.islice((i for i in range(len(labels)) if i not in chosen), count - len(chosen)))
    return sorted(chosen, key=lambda i: (int(labels[i]), i))


def preview_cells(params: AugmentParams, build_transform: BuildTransform, images: np.ndarray, seed: int,
                  draws: int = PREVIEW_DRAWS) -> list[list[np.ndarray]]:
    """The preview's rows: the images as stored, then `draws` rows of the training transform applied
    to the same images, the transform seeded with `seed` (none when no augmentation is configured)."""
    transform = build_transform(params, seed)
    rows = [list(images)]
    for _ in range(draws if params.steps() else 0):
        rows.append([transform(image=image)["image"] for image in images])
    return rows


def cell_origin(row: int, column: int) -> tuple[int, int]:
    """Top-left pixel (y, x) of a cell in the preview's mosaic."""
    return row * (IMAGE_SIDE + PREVIEW_GAP), column * (IMAGE_SIDE + PREVIEW_GAP)


def mosaic(rows: list[list[np.ndarray]]) -> np.ndarray:
    """The cells in one uint8 HWC image, PREVIEW_GAP white pixels between them."""
    last = cell_origin(len(rows) - 1, len(rows[0]) - 1)
    height, width = (end + IMAGE_SIDE for end in last)   # to the last cell's edge
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            y, x = cell_origin(r, c)
            out[y:y + IMAGE_SIDE, x:x + IMAGE_SIDE] = image
    return out


def augmentation_preview(params: AugmentParams, build_transform: BuildTransform, images: np.ndarray,
                         captions: Sequence[str], seed: int, draws: int = PREVIEW_DRAWS):
    """The images as stored (top row), then `draws` rows of the training transform applied to the
    same images, the transform seeded with `seed`: the same figure for the same seed and params.
    With no augmentation configured it shows the stored row once and says so.

    The cells are one image (`mosaic`) in one axes, framed and labelled around it: fifty axes under a
    layout engine cost several times as much (measured: docs/measurements.md)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure   # a bare Figure: pyplot keeps no reference to it in the training process
    from matplotlib.patches import Rectangle

    cells = preview_cells(params, build_transform, images, seed, draws)
    rows, columns = len(cells), len(images)
    fig = Figure(figsize=(1.2 * columns + 0.5, 1.2 * rows + 1.1))
    ax = fig.add_axes((0.04, 0.02, 0.95, 1 - 1.0 / fig.get_figheight()))   # an inch above for captions and title
    ax.imshow(mosaic(cells), interpolation="nearest")
    ax.set_anchor("N")                      # the mosaic right under its captions; the save trims what is left
    ax.set_axis_off()
    frames = [Rectangle((x - 0.5, y - 0.5), IMAGE_SIDE, IMAGE_SIDE)
              for r in range(rows) for c in range(columns) for y, x in [cell_origin(r, c)]]
    ax.add_collection(PatchCollection(frames, facecolor="none", edgecolor="black", linewidth=0.8, clip_on=False))
    for column, caption in enumerate(captions):
        y, x = cell_origin(0, column)
        ax.text(x + IMAGE_SIDE / 2 - 0.5, y - 2, caption, ha="center", va="bottom", fontsize=8)
    for row in range(rows):
        y, x = cell_origin(row, 0)
        ax.text(x - 3, y + IMAGE_SIDE / 2 - 0.5, "stored" if row == 0 else f"draw {row}", rotation=90,
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


def write_preview(params: AugmentParams, build_transform: BuildTransform, images: np.ndarray, labels: np.ndarray,
                  classes: Sequence[str], seed: int, path: Path = paths.AUGMENT_PREVIEW) -> None:
    """The train stage's preview figure of `params` on the training split (images, labels)."""
    chosen = preview_indices(labels)
    captions = [f"{classes[int(labels[i])]}\ntrain #{i}" for i in chosen]
    save_figure(augmentation_preview(params, build_transform, images[chosen], captions, seed), path, dpi=110,
                bbox_inches="tight", pad_inches=0.15)
