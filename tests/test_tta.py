"""Flip + translate test-time augmentation: the weighted mean of six views' probabilities."""

from __future__ import annotations

import torch
from torch import nn

from cifarlab.engine.metrics import FlipTranslateTTA


class Probe(nn.Module):
    """Logits that depend on where the image's mass is (so flips and shifts change them)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)
        torch.manual_seed(0)

    def forward(self, x):
        return self.fc(x.float()[..., :8, :8].flatten(1))


def test_six_views_weighted_as_airbench():
    model = Probe()
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    padded = nn.functional.pad(x.float(), (1, 1, 1, 1), mode="reflect")
    views = [(x.float(), 0.25), (padded[..., :16, :16], 0.125), (padded[..., 2:, 2:], 0.125)]
    expected = sum(weight * (model(v).softmax(1) + model(v.flip(3)).softmax(1)) for v, weight in views)
    got = FlipTranslateTTA(model)(x)
    assert torch.allclose(got.exp(), expected, atol=1e-6)
    assert torch.allclose(got.exp().sum(1), torch.ones(5), atol=1e-6)     # a distribution
    assert not torch.allclose(got.exp(), model(x).softmax(1), atol=1e-3)  # the views differ here

