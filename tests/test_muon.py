"""`optim.name: muon` (cifarlab.engine.muon) and the `fast_muon` preset: which parameters each side
steps, the filter step against torch.optim.Muon itself, OneCycle and the range test driving both
sides, bf16 autocast, a resumed run against a straight one, and 2-process DDP."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab.config.params import ParamsError, parse_params
from cifarlab.engine.classifier import Classifier
from cifarlab.engine.distributed import free_port
from cifarlab.engine.muon import MuonSGD
from cifarlab.engine.schedule import build_optimizer, build_scheduler, onecycle_for, onecycle_lr
from cifarlab.errors import CifarlabError
from conftest import composed, make_stage_dir, merge


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fast_muon() -> dict:
    return composed(["preset=fast_muon"])


def optim_params(**changes):
    return parse_params(merge(fast_muon(), {"optim": changes})).optim


def fast_net(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    model = Classifier("fast_net")
    model.init_from_data(np.random.default_rng(seed).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    return model


class Scaled(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:     # uint8-range images, as the loaders give
        return images.float() / 255


def small_convnet(seed: int = 0) -> torch.nn.Module:
    """Filters, a norm, a bias and a head, in a fraction of fast_net's time: for the tests of many steps."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(Scaled(), torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10, bias=False))


def batch(size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (size, 3, 32, 32), generator=generator).float(),
            torch.randint(0, 10, (size,), generator=generator))


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0, autocast=None,
         device: str = "cpu") -> None:
    images, labels = (tensor.to(device) for tensor in batch(seed=seed))
    optimizer.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()


# --- the preset -------------------------------------------------------------------------------------

def test_fast_muon_is_the_records_recipe_for_the_mean_loss_and_fast_nets_head():
    params = parse_params(fast_muon())
    o, t = params.optim, params.train
    assert params.model.name == "fast_net" and params.report.preset == "fast_muon"
    assert (t.batch_size, t.epochs, t.max_lr) == (2000, 8, 0.24)                       # the record's, Muon's LR as is
    assert (o.name, o.muon_momentum, o.muon_ns_steps, o.muon_renormalise, o.nesterov) == ("muon", 0.6, 3, True, True)
    assert (o.momentum, o.label_smoothing, o.whiten_bias_epochs, o.lookahead) == (0.85, 0.2, 3, False)
    head_lr, bias_lr = t.max_lr * o.muon_sgd_lr_scale, t.max_lr * o.muon_sgd_lr_scale * o.bias_lr_scale
    # The record's summed-loss LRs x its batch; its logits / 256 against fast_net's / 9 for the head.
    assert bias_lr == pytest.approx(0.053 * 2000, rel=0.01)
    assert head_lr == pytest.approx(0.67 * 2000 * (9 / 256) ** 2, rel=0.01)
    # 2e-6 x batch of each weight per step at the peak, on both SGD groups
    assert head_lr * o.weight_decay == pytest.approx(2e-6 * 2000, rel=0.01)
    assert bias_lr * o.weight_decay / o.bias_lr_scale == pytest.approx(2e-6 * 2000, rel=0.01)
    # no warm-up, linear decay to the record's last-step LR (1 - 199/200 of its first)
    assert (t.max_at_epoch, t.div_factor, t.final_div_factor, t.anneal_strategy) == (1, 1.0, 200.0, "linear")
    assert not t.cycle_momentum and t.drop_last
    assert (params.augment.path, params.augment.alternate_flip, params.augment.pad) == ("batch", True, 2)
    assert params.evaluate.tta_hflip and params.evaluate.tta_translate
    # `fast` stays beside it, as it was
    assert parse_params(composed(["preset=fast"])).optim.name == "sgd"


def test_muon_keys_are_checked_and_cycle_momentum_is_refused():
    with pytest.raises(ParamsError, match=r"`optim.muon_ns_steps` is 100; allowed: a whole number from 1 to 99"):
        optim_params(muon_ns_steps=100)
    with pytest.raises(ParamsError, match=r"`optim.muon_sgd_lr_scale` is 0; allowed: a number > 0"):
        optim_params(muon_sgd_lr_scale=0)
    with pytest.raises(ParamsError, match=r"^params key `train.cycle_momentum` is true; allowed with optim.name muon: "
                                          r"false"):
        parse_params(merge(fast_muon(), {"train": {"cycle_momentum": True}}))


# --- which parameters each side steps --------------------------------------------------------------

def test_filters_go_to_muon_one_d_to_the_bias_group_the_head_to_sgd_and_frozen_ones_nowhere():
    model = fast_net()
    o = optim_params()
    optimizer = build_optimizer(model, o, lr=0.24)
    assert isinstance(optimizer, MuonSGD)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad]
    assert [id(p) for p in optimizer.filters] == [id(p) for p in convs] and len(convs) == 6
    assert all(p is not model.net.whiten.weight for p in optimizer.filters)          # frozen: not a Muon filter
    biases, head = optimizer.sgd.param_groups
    norms = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [id(p) for p in biases["params"]] == [id(model.net.whiten.bias)] + [id(p) for p in norms]
    assert [id(p) for p in head["params"]] == [id(model.net.fc.weight)]
    assert biases["weight_decay"] == pytest.approx(o.weight_decay / 64) and head["weight_decay"] == o.weight_decay
    [group] = optimizer.param_groups                   # one LR, the Muon LR: what OneCycle and the logs see
    assert group["lr"] == 0.24
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    assert optimizer.muon.param_groups[0]["weight_decay"] == 0.0                    # the filters get no decay


def test_a_step_moves_what_trains_and_a_frozen_whitening_bias_not_at_all():
    model = fast_net()
    optimizer = build_optimizer(model, optim_params(), lr=0.24)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step(model, optimizer)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name                # frozen: same; trained: moved
    model.train_whitening_bias(False)                   # as optim.whiten_bias_epochs does after its epochs
    bias, filters = model.net.whiten.bias.detach().clone(), model.net.whiten.weight.detach().clone()
    step(model, optimizer, seed=1)
    assert torch.equal(model.net.whiten.bias, bias)      # it has momentum, but no gradient: no step at all
    assert torch.equal(model.net.whiten.weight, filters)


@pytest.mark.parametrize("channels_last, renormalise", [(False, True), (True, True), (False, False)])
def test_the_filter_step_is_torch_muons_step_of_the_filter_as_a_matrix(channels_last, renormalise):
    """Each filter (renormalised to norm sqrt(out channels) first, with muon_renormalise) is stepped by
    torch.optim.Muon as the matrix [out, in x kh x kw]; a channels_last filter, whose matrix holds the
    same columns in another order, gets the same step."""
    model = fast_net()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = optim_params(muon_renormalise=renormalise)
    optimizer = build_optimizer(model, o, lr=0.24)
    conv = model.net.groups.group2.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
    start = conv.detach().clone()
    step(model, optimizer)
    # the same step by hand: the (renormalised) filter as a contiguous matrix, its gradient, torch's Muon
    scaled = start * (math.sqrt(len(start)) / start.norm()) if renormalise else start
    matrix = scaled.contiguous().view(len(start), -1).clone()
    matrix.grad = conv.grad.contiguous().view(len(start), -1).clone()
    torch.optim.Muon([matrix], lr=0.24, weight_decay=0.0, momentum=o.muon_momentum, nesterov=True,
                     ns_steps=o.muon_ns_steps).step()
    expected = matrix.detach().view(start.shape)
    if channels_last:   # the same sums in another order, then bf16 Newton-Schulz: equal to rounding
        assert (conv - expected).norm() < 1e-2 * (expected - scaled).norm()
    else:
        assert torch.equal(conv, expected)
    assert torch.allclose(scaled.norm(), torch.tensor(16.0)) == renormalise      # sqrt(256 out channels)


def test_a_filter_whose_storage_is_replaced_after_the_build_is_still_the_one_stepped():
    model = small_convnet()
    optimizer = build_optimizer(model, optim_params(), lr=0.24)
    conv = model[1].weight
    conv.data = conv.data.clone()                       # as `module.to(...)` may do
    start = conv.detach().clone()
    step(model, optimizer)
    assert not torch.equal(conv, start)
    assert optimizer.muon.state[optimizer.muon.param_groups[0]["params"][0]]["momentum_buffer"].abs().sum() > 0


def test_refused_in_one_line_for_a_model_without_trainable_filters_or_a_torch_without_muon(monkeypatch):
    with pytest.raises(CifarlabError, match=r"^optim.name is muon but model Linear has no trainable conv filters"):
        build_optimizer(torch.nn.Linear(4, 2), optim_params(), lr=0.1)
    frozen = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    frozen[0].weight.requires_grad_(False)                 # a whitening-like conv, frozen: nothing for Muon
    with pytest.raises(CifarlabError, match=r"has no trainable conv filters .*\(frozen ones are not trained\)"):
        build_optimizer(frozen, optim_params(), lr=0.1)
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(CifarlabError, match=r"^optim.name is muon but torch .* has no torch.optim.Muon; allowed: "
                                            r"torch >= 2.9"):
        build_optimizer(fast_net(), optim_params(), lr=0.1)


# --- one LR drives both sides: OneCycle, the logs, the range test ----------------------------------

def test_onecycle_drives_muon_and_both_sgd_groups_at_fixed_ratios():
    params = parse_params(fast_muon())
    model = small_convnet()
    cycle = onecycle_for(params.train, steps_per_epoch=3, max_lr=params.train.max_lr)
    optimizer = build_optimizer(model, params.optim, lr=cycle.start_lr)
    scheduler = build_scheduler(optimizer, cycle, params.train.cycle_momentum)
    for s in range(cycle.total_steps):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(onecycle_lr(cycle, s), rel=1e-9)   # the logged LR
        step(model, optimizer, seed=s)
        lr = optimizer.param_groups[0]["lr"]
        assert optimizer.muon.param_groups[0]["lr"] == lr
        biases, head = optimizer.sgd.param_groups
        assert head["lr"] == pytest.approx(lr * 6.9) and biases["lr"] == pytest.approx(lr * 6.9 * 64)
        if s < cycle.total_steps - 1:
            scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.24 / 200)


def test_the_range_test_sweeps_the_whole_recipe_and_leaves_the_model_as_it_was():
    """torch-lr-finder sets and sweeps the one group's LR, the Muon LR; the SGD side follows at its ratios."""
    from cifarlab.data.loaders import train_loader
    from cifarlab.data.sources import make_synthetic
    from cifarlab.engine.runtime import Runtime
    from cifarlab.pipeline.lr_find import range_test

    params = parse_params(merge(fast_muon(), {"lr_find": {"num_iter": 16, "start_lr": 1e-3, "end_lr": 1.0}}))
    runtime = Runtime(torch.device("cpu"), "fp32", False, 0)
    data = make_synthetic(128, 10, 0)
    model = small_convnet()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = build_optimizer(model, params.optim, lr=params.lr_find.start_lr)
    sgd_step, seen = optimizer.sgd.step, []

    def recording_step(*args, **kwargs):
        biases, head = optimizer.sgd.param_groups
        seen.append((optimizer.param_groups[0]["lr"], optimizer.muon.param_groups[0]["lr"], head["lr"], biases["lr"]))
        return sgd_step(*args, **kwargs)

    optimizer.sgd.step = recording_step
    lrs, losses = range_test(model, optimizer, train_loader(data.train, params.augment, 8, 0, runtime).epoch(0),
                             runtime, params.lr_find)
    assert lrs[0] == pytest.approx(1e-3) and lrs == sorted(lrs) and len(lrs) == len(losses) == len(seen) >= 2
    assert [lr for lr, *_ in seen] == pytest.approx(lrs, rel=1e-9)
    for lr, muon, head, biases in seen:
        assert muon == lr and head == pytest.approx(lr * 6.9) and biases == pytest.approx(lr * 6.9 * 64)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


# --- precision --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_a_bf16_autocast_step_is_the_fp32_step_to_bf16_precision(device):
    """Under bf16 autocast the gradients come from bf16 products (Newton-Schulz runs in bf16 either way):
    the filters stay fp32 and take the fp32 run's Muon step, in direction and size, to bf16 precision.
    On CUDA the model is channels_last, as the runtime makes it there."""
    from cifarlab.engine.classifier import prepare_model
    from cifarlab.engine.runtime import Runtime

    results = []
    for autocast in (None, torch.autocast(device, dtype=torch.bfloat16)):
        model = prepare_model(fast_net(), Runtime(torch.device(device), "bf16", device == "cuda", 0))
        optimizer = build_optimizer(model, optim_params(), lr=0.24)
        start = model.net.groups.group3.conv1.weight.detach().clone()
        step(model, optimizer, autocast=autocast, device=device)
        conv = model.net.groups.group3.conv1.weight
        assert conv.dtype == torch.float32 and torch.isfinite(conv).all()
        results.append(conv.detach() - start * math.sqrt(len(start)) / start.norm())   # the Muon update
    fp32, bf16 = results
    assert torch.nn.functional.cosine_similarity(fp32.flatten(), bf16.flatten(), dim=0) > 0.95
    assert float(bf16.norm()) == pytest.approx(float(fp32.norm()), rel=0.05)


# --- resume: interrupted and resumed = straight ------------------------------------------------------

# The preset on a few synthetic images: 2 epochs of 2 steps, the whitening bias frozen from epoch 2,
# deterministic on one thread, so a resumed run can be compared with a straight one bit for bit.
TINY_MUON = {"data": {"source": "synthetic", "synthetic_train_size": 64, "synthetic_test_size": 20},
             "optim": {"whiten_bias_epochs": 1},
             "train": {"epochs": 2, "batch_size": 32},
             "evaluate": {"batch_size": 20, "tta_hflip": False, "tta_translate": False},
             "runtime": {"deterministic": True, "threads": 1}}


def fit_in(work: Path, monkeypatch) -> dict:
    from cifarlab.config.params import load_params
    from cifarlab.data.storage import load_dataset
    from cifarlab.engine.runtime import select_runtime
    from cifarlab.pipeline.train import fit

    monkeypatch.chdir(work)
    params = load_params("params.yaml")
    fit(params, load_dataset(Path("data")), select_runtime(params.runtime))
    return torch.load(work / "models/model.pt", weights_only=False)["state_dict"]


def test_an_interrupted_run_resumes_to_the_weights_of_a_straight_one(tmp_path, monkeypatch, capsys):
    from cifarlab.pipeline import plots, train

    monkeypatch.setattr(plots, "write_preview", lambda *args, **kwargs: None)   # the figure: not what is tested
    straight = make_stage_dir(tmp_path / "straight", merge(fast_muon(), TINY_MUON))
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight, interrupted)
    reference = fit_in(straight, monkeypatch)

    epoch = train._epoch

    def stop_in_epoch_2(run_, record, number, *args):
        if number == 2:
            raise KeyboardInterrupt
        return epoch(run_, record, number, *args)

    with monkeypatch.context() as patch:
        patch.setattr(train, "_epoch", stop_in_epoch_2)
        with pytest.raises(train.Interrupted, match="interrupted during epoch 2; the state after epoch 1 is saved"):
            fit_in(interrupted, monkeypatch)
    state = torch.load(next((interrupted / ".cache/train").glob("*.pt")), weights_only=False)
    assert state["trainables"]["optimizer"]["muon"]["state"]          # Muon's momentum buffers are in the state
    resumed = fit_in(interrupted, monkeypatch)
    assert "resuming from the end of epoch 1" in capsys.readouterr().out
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


# --- DDP --------------------------------------------------------------------------------------------


def no_norm_convnet() -> torch.nn.Module:
    """small_convnet without its BatchNorm, whose statistics are per process on a CPU: its conv bias is
    the 1-D parameter."""
    model = small_convnet()
    model[2] = torch.nn.Identity()
    return model


def two_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rows: slice) -> None:
    for seed in range(2):
        images, labels = batch(seed=seed)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images[rows]), labels[rows]).backward()
        optimizer.step()


def _ddp_process(rank: int, port: int, folder: str, optim) -> None:
    """One of 2 gloo processes, joined as torchrun's would be (`init_distributed`): DDP over
    no_norm_convnet, muon, two steps on this process's half of each batch; saves its weights."""
    from cifarlab.engine.distributed import init_distributed, shutdown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    world = init_distributed("cpu")
    model = no_norm_convnet()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    two_steps(ddp, build_optimizer(ddp, optim, lr=0.24), slice(8 * world.rank, 8 * world.rank + 8))
    torch.save(model.state_dict(), Path(folder) / f"rank{rank}.pt")
    shutdown()


def test_two_process_ddp_steps_muon_on_the_gradient_reduced_over_both(tmp_path):
    """2 CPU processes (gloo), each with half of every batch: both take the single-process steps of the
    whole batch, to float precision, and the same ones bit for bit; a process stepping on its own half's
    gradient would be far off."""
    import torch._dynamo  # noqa: F401  (DDP imports it: once here, not in each process)

    # forked, as DataLoader workers are: nothing is imported or composed again
    torch.multiprocessing.start_processes(_ddp_process, args=(free_port(), str(tmp_path), optim_params()), nprocs=2,
                                          start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    references = []
    for rows in (slice(0, 16), slice(0, 8)):          # the whole batch; the first process's half alone
        model = no_norm_convnet()
        two_steps(model, build_optimizer(model, optim_params(), lr=0.24), rows)
        references.append(model.state_dict())

    def relative(a: dict, b: dict) -> float:
        difference = torch.cat([(a[name] - b[name]).flatten() for name in a]).norm()
        return float(difference / torch.cat([value.flatten() for value in b.values()]).norm())

    whole, half = references
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in whole)
    print(f"relative weight difference, DDP vs one process: {relative(ranks[0], whole):.1e} "
          f"(one process's half alone: {relative(half, whole):.1e})")
    assert relative(ranks[0], whole) < 1e-3 < relative(half, whole)
