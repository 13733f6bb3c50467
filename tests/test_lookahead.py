"""Lookahead with an EMA of the weights: the slow copy, the reset of the fast weights, the schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifarlab.engine.lookahead import BASE, EVERY, Lookahead


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_every_fifth_step_the_slow_weights_follow_and_the_fast_ones_are_reset():
    net = model()
    look = Lookahead(net, total_steps=100)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)                     # what some optimizer steps did
        net[1].running_mean.add_(2.0)
    for step in range(1, EVERY):
        look.after_step(step)                       # not a multiple of EVERY: nothing happens
    assert torch.equal(net[0].weight, start + 1.0)
    look.after_step(EVERY)
    decay = BASE ** EVERY * (EVERY / 100) ** 3
    assert look.decay(EVERY) == pytest.approx(decay)
    expected = decay * start + (1 - decay) * (start + 1.0)
    assert torch.allclose(net[0].weight, expected) and torch.allclose(look.slow["0.weight"], expected)
    assert torch.allclose(net[1].running_mean, torch.full((2,), 2.0 * (1 - decay)))   # BN statistics too
    assert "1.num_batches_tracked" not in look.slow                                   # integers are not averaged


def test_decay_grows_to_base_to_the_every_and_finish_takes_the_slow_weights():
    net = model()
    look = Lookahead(net, total_steps=100)
    assert look.decay(0) == 0 and look.decay(100) == pytest.approx(BASE ** EVERY)
    assert look.decay(50) == pytest.approx(BASE ** EVERY / 8)
    slow = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(3.0)
    look.after_step(100)                            # the last step is left to finish()
    assert torch.equal(net[0].weight, slow + 3.0)
    look.finish()
    assert torch.equal(net[0].weight, slow)


def test_state_round_trips_for_resume():
    net = model()
    look = Lookahead(net, total_steps=10)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    look.after_step(5)
    saved = look.state_dict()
    other = Lookahead(model(), total_steps=10)
    other.load_state_dict(saved)
    assert all(torch.equal(other.slow[k], look.slow[k]) for k in saved)
