"""The LR range test and its rules: every answer lies in the descending window below the smoothed
loss minimum, whatever the curve's shape; the test stops once the loss has clearly turned up."""

import json

import numpy as np
import pytest
import torch

from cifarlab.config.lr_rules import (MIN_NUM_ITER, MIN_WINDOW, RULES, SKIP_START, CurveError, min_div_10, steepest,
                                      suggestions, window)
from cifarlab.config.params import ParamsError, parse_params
from cifarlab.data.loaders import train_loader
from cifarlab.data.sources import make_synthetic
from cifarlab.engine.classifier import build_model
from cifarlab.pipeline.lr_find import range_test, turned_up
from cifarlab.engine.runtime import select_runtime
from cifarlab.engine.schedule import build_optimizer
from conftest import merge, run_script


def smoothed(raw: np.ndarray, smooth_f: float = 0.05) -> np.ndarray:
    """torch-lr-finder's smoothing of the recorded loss."""
    out = [raw[0]]
    for value in raw[1:]:
        out.append(smooth_f * value + (1 - smooth_f) * out[-1])
    return np.asarray(out)


def real_default_curve() -> tuple[np.ndarray, np.ndarray]:
    """The shape the default preset's range test recorded on real CIFAR-10 (183 of 200 points,
    1e-7 .. 10): flat at 2.94, falling fastest early (near 6e-5), lowest (1.57) near 1e-2, up to
    3.01 by 0.13, then falling again to 2.55 by 1.2 as the diverged network saturates."""
    lrs = np.logspace(-7, 1, 200)[:183]
    x = np.log10(lrs)
    fall = 2.94 - 0.9 / (1 + np.exp(-4 * (x + 4.23))) - 0.47 * np.clip((x + 4.5) / 2.5, 0, 1)
    rise = np.interp(x, [-2.0, -0.886, -0.6, 0.08], [1.57, 3.01, 2.55, 2.55])
    return lrs, np.where(x <= -2.0, fall, rise)


def test_real_curve_regression_every_rule_stays_below_the_minimum():
    lrs, losses = real_default_curve()
    w = window(lrs, losses)
    assert 7e-3 < w.minimum_lr < 1.3e-2
    # The old rule read the whole trimmed curve: its steepest fall is the post-divergence descent.
    whole = lrs[SKIP_START:-5][np.gradient(losses[SKIP_START:-5]).argmin()]
    assert whole > 10 * w.minimum_lr
    found = suggestions(w)
    assert set(found) == set(RULES)
    for rule, lr in found.items():
        assert w.lrs[0] <= lr < w.minimum_lr, rule
    # Inside the window the steepest fall is the early descent: why min_div_10 is the default.
    assert found["steepest"] < 3e-4
    assert found["min_div_10"] == pytest.approx(w.minimum_lr / 10)


def generated_curves(seed: int):
    """Curve shapes a range test can record, smoothed as torch-lr-finder smooths them."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(MIN_NUM_ITER + 20, 260))
    lrs = np.logspace(-7, rng.uniform(-1, 1), n)
    x = np.linspace(0, 1, n)
    start = rng.uniform(2.0, 3.2)
    turn = rng.uniform(0.4, 0.9)           # where the loss is lowest, as a fraction of the curve
    depth = rng.uniform(0.2, 0.8) * start
    fall = start - depth * np.clip((x - rng.uniform(0, 0.3)) / turn, 0, 1) ** rng.uniform(0.5, 2)
    rise = np.where(x > turn, rng.uniform(2, 20) * (x - turn) ** 2, 0.0)
    shape = ("monotone", "noisy", "fall-rise", "fall-rise-fall", "flat-start", "short", "nan-tail")[seed % 7]
    raw = fall.copy()
    if shape in ("fall-rise", "noisy", "nan-tail", "flat-start"):
        raw = fall + rise
    if shape == "noisy":
        raw = raw + rng.normal(0, 0.3, n)
    if shape == "fall-rise-fall":      # diverged, saturated, loss drifting back toward ln 10
        peak = turn + 0.15
        raw = fall + np.where(x > turn, np.minimum(x - turn, peak - turn) * 8 - np.clip(x - peak, 0, None) * 6, 0)
    if shape == "flat-start":
        raw = np.where(x < 0.5, start + rng.normal(0, 0.01, n), raw)
    if shape == "short":
        keep = MIN_NUM_ITER + int(rng.integers(0, 10))
        lrs, raw = lrs[:keep], np.linspace(start, start - depth, keep)
    curve = smoothed(np.maximum(raw, 0.01))
    if shape == "nan-tail":
        curve[int(0.9 * len(curve)):] = np.nan
    return shape, lrs, curve


@pytest.mark.parametrize("seed", range(210))
def test_every_rule_answers_inside_the_descending_window(seed):
    shape, lrs, losses = generated_curves(seed)
    try:
        w = window(lrs, losses)
    except CurveError:
        # Only a curve whose lowest point comes too early has no window; say so, never guess.
        finite = losses[SKIP_START:][np.isfinite(losses[SKIP_START:])]
        assert np.argmin(finite) < MIN_WINDOW, shape
        return
    lowest = SKIP_START + int(np.nanargmin(np.where(np.isfinite(losses), losses, np.inf)[SKIP_START:]))
    assert w.minimum_lr == lrs[lowest]
    for rule, lr in suggestions(w).items():
        assert lrs[SKIP_START] <= lr < w.minimum_lr, (shape, rule)
        # in the descending window: no point at or past the minimum
        assert lr <= w.lrs[-1] or rule == "min_div_10", (shape, rule)


def test_a_curve_without_a_descent_is_one_clear_line():
    lrs = np.logspace(-7, 1, 60)
    with pytest.raises(CurveError, match="raise lr_find.num_iter or lower lr_find.start_lr"):
        window(lrs, np.linspace(2.0, 5.0, 60))       # lowest at the trimmed start
    with pytest.raises(CurveError, match="raise lr_find.num_iter"):
        window(lrs[:12], np.linspace(3.0, 2.0, 12))


def test_min_div_10_never_goes_below_the_tested_range():
    lrs = np.logspace(-3, -2, 40)                    # minimum within 10x of the window's start
    losses = np.concatenate([np.linspace(3, 1, 30), np.linspace(1.1, 3, 10)])
    w = window(lrs, losses)
    assert min_div_10(w) == w.lrs[0]
    assert w.lrs[0] <= steepest(w) < w.minimum_lr


def test_the_range_test_stops_once_the_loss_turns_up_even_when_it_saturates():
    lrs, losses = real_default_curve()
    peak = int(np.argmax(losses[100:])) + 100
    stops = [i for i in range(1, len(losses)) if turned_up(list(losses[:i]), 0.5)]
    assert stops, "the saturating curve never tripped the stop"
    first = stops[0]
    assert window(lrs, losses).minimum_lr < lrs[first - 1] < lrs[peak]
    assert not turned_up([2.3, 2.31, 2.29, 2.32, 2.3], 0.5)           # a flat start does not stop it
    assert turned_up([2.3, 2.0, float("nan")], 0.5)                   # nan/inf does
    assert turned_up([2.3, 2.3, 2.3, 3.0], 0.5)                       # nor does a curve that only blows up


def test_too_few_iterations_are_refused_when_params_load(default_params):
    with pytest.raises(ParamsError, match=rf"`lr_find.num_iter` is 10; allowed: a whole number >= {MIN_NUM_ITER}"):
        parse_params(merge(default_params, {"lr_find": {"num_iter": 10}}))
    parse_params(merge(default_params, {"lr_find": {"num_iter": MIN_NUM_ITER}}))
    with pytest.raises(ParamsError, match="`lr_find.rule` is 'loss_minimum'; allowed: one of min_div_10"):
        parse_params(merge(default_params, {"lr_find": {"rule": "loss_minimum"}}))


def test_range_test_leaves_the_model_untouched(default_params):
    params = parse_params(merge(default_params, {
        "model": {"name": "a7_net"}, "runtime": {"precision": "fp32", "device": "cpu"},
        "lr_find": {"num_iter": 20, "end_lr": 1.0}}))
    runtime = select_runtime(params.runtime)
    data = make_synthetic(256, 10, 0)
    loader = train_loader(data.train, params.augment, 32, 0, runtime)
    model = build_model(params.model, runtime, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, params.optim, lr=params.lr_find.start_lr)
    lrs, losses = range_test(model, optimizer, loader.epoch(0), runtime, params.lr_find)
    assert len(lrs) == len(losses) and 2 <= len(lrs) <= 20
    assert lrs[0] == pytest.approx(params.lr_find.start_lr) and lrs == sorted(lrs)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_divergence_advice_follows_how_the_max_lr_was_chosen(tmp_path):
    from cifarlab.pipeline.max_lr import resolve
    from cifarlab.pipeline.train import divergence_advice

    found = tmp_path / "lr_find.json"
    found.write_text(json.dumps({"max_lr": 0.3, "rule": "steepest", "loss_minimum_lr": 0.9}))
    advice = divergence_advice(resolve("find", found))
    assert "lr_find's `steepest` rule (loss minimum at 0.9)" in advice and "e.g. 0.1" in advice
    assert "find" not in advice.replace("lr_find", "")          # never "use find" when find chose it
    assert divergence_advice(resolve(0.3, found)).startswith("lower train.max_lr (e.g. 0.1), or set it to `find`")


# --- when the stage runs the range test (lr_find.when) ---------------------------------------------

NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.path.insert(0, 'stages'); "
            "runpy.run_path('stages/lr_find.py', run_name='__main__')")


def test_range_test_runs_only_when_something_uses_it(default_params):
    from cifarlab.pipeline.lr_find import wanted

    for max_lr, when, runs in ((0.003, "find", False), ("find", "find", True), (0.003, "always", True),
                               ("find", "always", True)):
        params = parse_params(merge(default_params, {"train": {"max_lr": max_lr}, "lr_find": {"when": when}}))
        assert wanted(params) is runs, (max_lr, when)
    with pytest.raises(ParamsError, match=r"^params key `lr_find.when` is 'sometimes'; allowed: one of find, always$"):
        parse_params(merge(default_params, {"lr_find": {"when": "sometimes"}}))


def test_a_numeric_max_lr_trains_nothing_imports_no_torch_and_writes_the_same_bytes(stage_dir, tiny_params):
    """With a number and lr_find.when `find` the stage is a no-op: run with torch made unimportable, it
    still succeeds, and its outputs are the same bytes for two numbers (so nothing after it reruns)."""
    from cifarlab.pipeline.lr_find import NOT_RUN, NOT_RUN_CURVE
    from conftest import run, write_params

    written = []
    for max_lr in (0.003, 1.5):
        write_params(stage_dir, merge(tiny_params, {"train": {"max_lr": max_lr}}))
        result = run(["python", "-c", NO_TORCH], stage_dir)
        assert "lr_find: not run" in result.stdout and "lr_find.when: always" in result.stdout
        written.append([(stage_dir / name).read_bytes() for name in ("metrics/lr_find.json", "plots/lr_find.csv")])
    assert written[0] == written[1]
    assert json.loads(written[0][0]) == NOT_RUN and written[0][1].decode() == NOT_RUN_CURVE
    # the same guard catches a stage that does need torch: `always` runs the range test
    write_params(stage_dir, merge(tiny_params, {"lr_find": {"when": "always"}}))
    assert run(["python", "-c", NO_TORCH], stage_dir, check=False).returncode != 0


def test_always_runs_the_range_test_and_suggests_below_the_loss_minimum(stage_dir, tiny_params):
    from conftest import write_params

    write_params(stage_dir, merge(tiny_params, {"lr_find": {"when": "always"}}))
    run_script(stage_dir, "stages/lr_find.py")
    found = json.loads((stage_dir / "metrics/lr_find.json").read_text())
    assert found["ran"] is True and found["max_lr"] == found["suggestions"][found["rule"]]
    low, high = found["window"]
    assert high == found["loss_minimum_lr"]
    for rule, lr in found["suggestions"].items():
        assert low <= lr < found["loss_minimum_lr"], rule
    rows = (stage_dir / "plots/lr_find.csv").read_text().splitlines()
    assert rows[0] == "lr,loss" and len(rows) == found["iterations"] + 1


def test_a_minimum_at_the_sweeps_end_is_marked_as_such():
    """A curve still falling where the sweep ends has its lowest point there: not where the loss turns up."""
    from cifarlab.config.params import LrFindParams
    from cifarlab.pipeline.lr_find import read_curve

    params = LrFindParams(when="find", start_lr=1e-7, end_lr=1.0, num_iter=40, step_mode="exp", smooth_f=0.05,
                          stop_rebound=0.5, rule="min_div_10")
    lrs = list(np.logspace(-7, 0, 40))
    falling = read_curve(lrs, list(np.linspace(2.3, 1.0, 40)), params)
    assert falling["minimum_at_end"] is True and falling["loss_minimum_lr"] == lrs[-1]
    turned = read_curve(lrs, list(np.concatenate([np.linspace(2.3, 1.0, 30), np.linspace(1.1, 2.5, 10)])), params)
    assert turned["minimum_at_end"] is False and turned["loss_minimum_lr"] == lrs[29]
    assert turned["max_lr"] == pytest.approx(lrs[29] / 10) and turned["ran"] is True
