import pytest
import torch

from cifarlab.config.params import parse_params
from cifarlab.engine.schedule import OneCycle, build_optimizer, build_scheduler, onecycle_for, onecycle_lr
from conftest import merge

# The seeds' assignment 10: 24 epochs x 98 batches (50,000 / 512), peak at the end of epoch 5,
# max LR 1.7e-3 from the range test, div_factor 100, no annihilation (final_div_factor 1).
A10 = OneCycle(max_lr=1.7e-3, total_steps=24 * 98, peak_step=5 * 98 - 1, div_factor=100.0, final_div_factor=1.0)


def torch_lrs(cycle: OneCycle, cycle_momentum: bool = False) -> list[float]:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=cycle.start_lr)
    scheduler = build_scheduler(optimizer, cycle, cycle_momentum)
    lrs = []
    for _ in range(cycle.total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler.last_epoch < cycle.total_steps - 1:   # as loops.train_one_epoch does
            scheduler.step()
    return lrs


def test_a10_values_at_first_peak_and_last_step():
    assert onecycle_lr(A10, 0) == pytest.approx(1.7e-5)
    assert onecycle_lr(A10, 5 * 98 - 1) == pytest.approx(1.7e-3)      # last batch of epoch 5
    assert onecycle_lr(A10, 5 * 98 - 2) < 1.7e-3
    assert onecycle_lr(A10, 5 * 98) < 1.7e-3
    assert onecycle_lr(A10, 24 * 98 - 1) == pytest.approx(1.7e-5)     # ends at the start LR
    assert max(onecycle_lr(A10, s) for s in range(A10.total_steps)) == pytest.approx(1.7e-3)


def test_annihilation_ends_below_start():
    cycle = OneCycle(1e-2, 100, 29, div_factor=25.0, final_div_factor=1e4)
    assert onecycle_lr(cycle, 99) == pytest.approx(1e-2 / 25 / 1e4)


@pytest.mark.parametrize("cycle", [
    A10,
    OneCycle(0.05, 20 * 391, 5 * 391 - 1, 10.0, 1.0),                           # A8-style, batch 128
    OneCycle(0.01, 120, 29, 25.0, 1e4, anneal_strategy="cos"),
    OneCycle(0.01, 120, 29, 25.0, 1e4, three_phase=True),
    OneCycle(0.01, 40, 39, 10.0, 1.0),                                           # peak at the very end
])
def test_pure_function_matches_torch_onecycle(cycle):
    expected = torch_lrs(cycle)
    assert [onecycle_lr(cycle, s) for s in range(cycle.total_steps)] == pytest.approx(expected, rel=1e-9)


def test_built_from_params_steps_every_batch(default_params):
    train = parse_params(default_params).train
    cycle = onecycle_for(train, steps_per_epoch=98, max_lr=1.7e-3)
    assert cycle == A10
    assert torch_lrs(cycle)[5 * 98 - 1] == pytest.approx(1.7e-3)


def test_outside_steps_rejected():
    with pytest.raises(ValueError):
        onecycle_lr(A10, A10.total_steps)


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                      ("sgd", torch.optim.SGD)])
def test_optimizers(default_params, name, cls):
    optim = parse_params(merge(default_params, {"optim": {"name": name, "nesterov": True}})).optim
    optimizer = build_optimizer(torch.nn.Linear(2, 2), optim, lr=0.1)
    assert type(optimizer) is cls
    assert optimizer.defaults["weight_decay"] == pytest.approx(1e-4)
    if name == "sgd":
        assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    else:
        assert optimizer.defaults["betas"][0] == 0.9


def test_bias_lr_scale_trains_biases_and_norm_shifts_at_a_multiple_of_the_lr(default_params):
    """optim.bias_lr_scale: a second param group (the normalisation layers' parameters) at scale x the
    LR and weight decay / scale, and OneCycle keeps that ratio at every step; frozen parameters train in none."""
    from cifarlab.engine.classifier import Classifier
    from cifarlab.config.params import parse_params
    from cifarlab.engine.schedule import build_optimizer, build_scheduler, onecycle_for

    params = parse_params(merge(default_params, {"optim": {"name": "sgd", "bias_lr_scale": 64.0,
                                                           "weight_decay": 0.0128, "nesterov": True},
                                                 "model": {"name": "fast_net"}}))
    model = Classifier("fast_net")
    optimizer = build_optimizer(model, params.optim, lr=0.01)
    weights, biases = optimizer.param_groups
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [id(p) for p in biases["params"]] == [id(m.bias) for m in norms]     # the shifts; scales are frozen
    assert any(p is model.net.whiten.bias for p in weights["params"])          # other biases train at the LR
    assert biases["lr"] == 0.64 and biases["weight_decay"] == 0.0128 / 64
    assert all(p is not model.net.whiten.weight for p in weights["params"])   # frozen: in no group
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())
    scheduler = build_scheduler(optimizer, onecycle_for(params.train, 10, 0.1), cycle_momentum=True)
    for _ in range(params.train.epochs * 10 - 1):
        assert abs(biases["lr"] - 64 * weights["lr"]) < 1e-9 * biases["lr"]
        optimizer.step()
        scheduler.step()
    one_group = build_optimizer(model, parse_params(default_params).optim, lr=0.01)
    assert len(one_group.param_groups) == 1
