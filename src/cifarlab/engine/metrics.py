"""Classification summaries computed from per-image predictions, and horizontal-flip test-time
augmentation as a model wrapper (so the one `loops.evaluate` measures it too)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from cifarlab.config.params import TTA_LABELS


def confusion_matrix(target: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(target), np.asarray(predicted)), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    totals = matrix.sum(axis=1)
    return {name: float(matrix[i, i] / totals[i]) if totals[i] else 0.0 for i, name in enumerate(classes)}


def most_confident_mistakes(target: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                            count: int) -> np.ndarray:
    """Indices of up to `count` misclassified images, most confident first."""
    wrong = np.flatnonzero(np.asarray(target) != np.asarray(predicted))
    order = np.argsort(-np.asarray(confidence)[wrong], kind="stable")
    return wrong[order[:count]]


class HorizontalFlipTTA(nn.Module):
    """`model` averaged over each image and its mirror image (flip of the width axis).

    Returns the log of the mean of the two softmax distributions: valid logits, so cross-entropy,
    argmax and softmax confidence computed on them by `loops.evaluate` are those of the averaged
    prediction.
    """

    LABEL = TTA_LABELS["tta_hflip"]

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.model(x).float().log_softmax(1)
        flipped = self.model(torch.flip(x, dims=(3,))).float().log_softmax(1)
        return torch.logaddexp(plain, flipped) - math.log(2.0)


class FlipTranslateTTA(nn.Module):
    """`model` averaged over six views of each image: itself and its mirror image (weight 1/4 each),
    and both shifted by one pixel up-left and down-right with reflected borders (1/8 each), as
    airbench94's test-time augmentation (Jordan 2024, section 3.7). Returns log mean probabilities,
    like HorizontalFlipTTA."""

    LABEL = TTA_LABELS["tta_translate"]
    SHIFT = 1

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        padded = nn.functional.pad(x.float(), (self.SHIFT,) * 4, mode="reflect")
        views = [(x, 1 / 4), (padded[..., :height, :width], 1 / 8),
                 (padded[..., 2 * self.SHIFT:, 2 * self.SHIFT:], 1 / 8)]
        terms = []
        for view, weight in views:
            for image in (view, torch.flip(view, dims=(3,))):
                terms.append(self.model(image).float().log_softmax(1) + math.log(weight))
        return torch.logsumexp(torch.stack(terms), dim=0)


# The test-time augmentations by their `evaluate.*` switch (config.params.TTA_LABELS names them).
TTA_VARIANTS = {"tta_hflip": HorizontalFlipTTA, "tta_translate": FlipTranslateTTA}
