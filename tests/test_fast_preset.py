"""The `fast` preset (airbench94's recipe) as a preset like any other: its numbers and its frozen
whitening bias (tests/e2e/test_fast_preset_runs.py runs every stage with it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifarlab.config.params import ParamsError, parse_params
from cifarlab.engine.classifier import Classifier
from cifarlab.engine.schedule import build_optimizer
from conftest import composed, merge


def fast() -> dict:
    return composed(["preset=fast"])


def test_fast_preset_is_airbench94s_recipe_for_the_mean_loss():
    params = parse_params(fast())
    assert params.model.name == "fast_net" and params.report.preset == "fast"
    assert (params.train.batch_size, params.train.epochs, params.train.max_lr) == (1024, 12, 1.5)
    assert (params.optim.name, params.optim.nesterov, params.optim.momentum) == ("sgd", True, 0.85)
    assert params.optim.label_smoothing == 0.2 and params.optim.bias_lr_scale == 64 and params.optim.lookahead
    assert params.optim.whiten_bias_epochs == 3
    # 0.002 of each weight per step at the peak: airbench94's 0.0153 per 1024 images, decoupled
    assert params.train.max_lr * params.optim.weight_decay == pytest.approx(0.0153 * 1024 / (1024 * (1 + 1 / 0.15)),
                                                                           rel=0.01)
    assert (params.augment.path, params.augment.alternate_flip, params.augment.pad) == ("batch", True, 2)
    assert params.augment.cutout_size == 0
    assert params.evaluate.tta_hflip and params.evaluate.tta_translate
    # warm-up from 0.2 x the peak, linear decay to 0.07 x the peak, momentum not cycled
    assert params.train.div_factor == 5 and 1 / (params.train.div_factor * params.train.final_div_factor) == \
        pytest.approx(0.07, rel=0.01)
    assert params.train.anneal_strategy == "linear" and not params.train.cycle_momentum


def whitening_step(trainable: bool) -> tuple[torch.Tensor, torch.Tensor, Classifier]:
    """The fast preset's optimizer (momentum, weight decay, the 64x bias group) built as the trainer
    builds it, one step with the whitening bias training (so it has momentum), then a second step
    with it training or frozen: (the bias before the second step, after it, the model)."""
    params = parse_params(fast())
    torch.manual_seed(0)
    model = Classifier("fast_net")
    model.init_from_data(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    optimizer = build_optimizer(model, params.optim, lr=0.5)
    images, labels = torch.randint(0, 256, (16, 3, 32, 32)).float(), torch.randint(0, 10, (16,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()
    model.train_whitening_bias(trainable)
    before = model.net.whiten.bias.detach().clone()
    step()
    return before, model.net.whiten.bias.detach(), model



def test_a_frozen_whitening_bias_stays_and_skips_the_first_groups_input_gradient():
    before, after, model = whitening_step(trainable=False)
    assert torch.equal(before, after)                          # no gradient, no momentum, no weight decay
    assert model.net.whiten.bias.grad is None and model.net.groups.group1.conv1.weight.grad is not None
    # Nothing below group1 needs a gradient, so autograd never computes its first conv's input gradient.
    assert not model.net.act(model.net.whiten(model.normalize(torch.zeros(1, 3, 32, 32)))).requires_grad
    before, after, _ = whitening_step(trainable=True)
    assert not torch.equal(before, after)


def test_whiten_bias_epochs_is_refused_for_a_model_without_whitening():
    raw = merge(fast(), {"model": {"name": "custom_resnet"}})
    with pytest.raises(ParamsError, match=r"^params key `optim.whiten_bias_epochs` is 3; allowed: null for model "
                                          r"custom_resnet \(only a model with a whitening conv"):
        parse_params(raw)
    with pytest.raises(ParamsError, match=r"`optim.whiten_bias_epochs` is 0; allowed: null or a whole number >= 1"):
        parse_params(merge(fast(), {"optim": {"whiten_bias_epochs": 0}}))
    assert parse_params(merge(raw, {"optim": {"whiten_bias_epochs": None}})).optim.whiten_bias_epochs is None
