"""Classification summaries computed from per-image predictions."""

from __future__ import annotations

from typing import Sequence

import numpy as np


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
