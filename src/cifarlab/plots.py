"""Matplotlib figures for the stages and the report. Each function returns a Figure; the caller
saves it with `cifarlab.atomic.save_figure`."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def lr_find_figure(lrs: Sequence[float], losses: Sequence[float], candidates: Mapping[str, float],
                   chosen: str, loss_minimum: float):
    """The range-test curve, every rule's candidate marked, the chosen one highlighted."""
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(lrs, losses, color="tab:blue", label="smoothed training loss")
    colours = dict(zip(candidates, ("tab:green", "tab:orange", "tab:purple", "tab:brown")))
    for name, lr in candidates.items():
        ax.axvline(lr, color=colours[name], linewidth=3 if name == chosen else 1,
                   linestyle="-" if name == chosen else "--",
                   label=f"{name}: {lr:.2e}" + ("  (chosen max LR)" if name == chosen else ""))
    ax.axvline(loss_minimum, color="tab:red", linestyle=":", label=f"loss minimum: {loss_minimum:.2e} (never used)")
    ax.set_xscale("log")
    finite = np.asarray([x for x in losses if np.isfinite(x)])
    if len(finite):
        ax.set_ylim(finite.min() - 0.05 * abs(finite.min()), min(finite.max(), 4 * finite.min()) * 1.05)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss")
    ax.set_title("LR range test")
    ax.legend(loc="best", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def schedule_figure(lrs: Sequence[float], steps_per_epoch: int, max_at_epoch: int):
    fig, ax = plt.subplots(figsize=(8, 4))
    epochs = np.arange(len(lrs)) / steps_per_epoch
    ax.plot(epochs, lrs, color="tab:blue")
    ax.axvline(max_at_epoch, color="tab:gray", linestyle="--", label=f"end of epoch {max_at_epoch} (peak)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title(f"OneCycle LR per batch ({len(lrs)} steps, {steps_per_epoch} per epoch)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def curves_figure(history: Mapping[str, Sequence[float]]):
    """Loss and accuracy per epoch, train and test side by side."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-o"), ("test", "-s")):
        epochs = np.arange(1, len(history[f"{split}/loss"]) + 1)
        loss_ax.plot(epochs, history[f"{split}/loss"], style, markersize=3, label=split)
        acc_ax.plot(epochs, 100 * np.asarray(history[f"{split}/accuracy"]), style, markersize=3, label=split)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(True, alpha=0.3)
        ax.legend()
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
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (test split; colour = share of the true class)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def gallery_figure(images: np.ndarray, titles: Sequence[str], title: str, columns: int = 5):
    """A grid of uint8 HWC images with a caption each."""
    count = max(len(images), 1)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, titles):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=8)
    if len(images) == 0:
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
