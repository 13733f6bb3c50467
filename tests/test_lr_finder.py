import numpy as np
import pytest
import torch

from cifarlab.augment import build_train_transform
from cifarlab.data import make_synthetic
from cifarlab.engine import build_model, select_runtime, train_loader
from cifarlab.errors import CifarlabError
from cifarlab.lr_finder import loss_minimum_lr, min_div_10, range_test, steepest, suggestions, valley
from cifarlab.params import parse_params
from cifarlab.schedule import build_optimizer
from conftest import merge

LRS = np.logspace(-7, 1, 120)


def typical_curve() -> np.ndarray:
    """Flat, then falling fastest around 1e-3, bottoming out near 1e-1, then exploding."""
    x = np.log10(LRS)
    fall = 1.5 / (1 + np.exp(-2.5 * (x + 3)))
    explode = np.where(x > -1, 20 * (x + 1) ** 2, 0.0)
    return 2.3 - fall + explode


def test_steepest_is_where_the_loss_falls_fastest():
    assert 3e-4 < steepest(LRS, typical_curve()) < 3e-3


def test_every_rule_is_below_the_loss_minimum():
    losses = typical_curve()
    minimum = loss_minimum_lr(LRS, losses)
    assert 1e-2 < minimum < 2e-1
    for rule, lr in suggestions(LRS, losses).items():
        assert lr < minimum, rule
    assert min_div_10(LRS, losses) == pytest.approx(minimum / 10)
    assert 1e-4 < valley(LRS, losses) < minimum


def test_too_short_a_curve_is_a_clear_error():
    with pytest.raises(CifarlabError, match="raise lr_find.num_iter"):
        steepest(LRS[:10], typical_curve()[:10])


def test_non_finite_points_are_ignored():
    losses = typical_curve()
    losses[-3:] = np.nan
    assert np.isfinite(steepest(LRS, losses))


def test_range_test_leaves_the_model_untouched(default_params):
    params = parse_params(merge(default_params, {
        "model": {"name": "a7_net"}, "runtime": {"precision": "fp32", "device": "cpu"},
        "lr_find": {"num_iter": 20, "end_lr": 1.0}}))
    runtime = select_runtime(params.runtime)
    data = make_synthetic(256, 10, 0)
    loader = train_loader(data.train, build_train_transform(params.augment), 32, 0, runtime)
    model = build_model(params.model, runtime, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, params.optim, lr=params.lr_find.start_lr)
    lrs, losses = range_test(model, optimizer, loader.epoch(0), runtime, params.lr_find)
    assert len(lrs) == len(losses) and 17 <= len(lrs) <= 20
    assert lrs[0] == pytest.approx(params.lr_find.start_lr) and lrs == sorted(lrs)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
