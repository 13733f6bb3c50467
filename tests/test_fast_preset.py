"""The `fast` preset (airbench94's recipe) as a preset like any other: its numbers, and every stage
running with it on the tiny synthetic set (batch augmentation on the device, lookahead, bias LR
scale, both TTA figures, the time-to-accuracy plot, Grad-CAM at fast_net's layer)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from cifarlab import compose as composition
from cifarlab.params import parse_params
from conftest import REPO, TINY, copy_code, merge, run, write_params


def fast() -> dict:
    return yaml.safe_load(composition.compose_text(["preset=fast"], REPO / "conf"))


def test_fast_preset_is_airbench94s_recipe_for_the_mean_loss():
    params = parse_params(fast())
    assert params.model.name == "fast_net" and params.report.preset == "fast"
    assert (params.train.batch_size, params.train.epochs, params.train.max_lr) == (1024, 10, 1.5)
    assert (params.optim.name, params.optim.nesterov, params.optim.momentum) == ("sgd", True, 0.85)
    assert params.optim.label_smoothing == 0.2 and params.optim.bias_lr_scale == 64 and params.optim.lookahead
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


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("fast_run") / "work"
    copy_code(work)
    write_params(work, merge(fast(), merge(TINY, {"train": {"batch_size": 64, "max_lr": 0.5, "epochs": 3},
                                                  "evaluate": {"gradcam_size": 2, "gallery_size": 2}})))
    for stage in ("download", "lr_find", "train", "evaluate", "report"):
        result = run(["python", f"stages/{stage}.py"], work)
        if stage == "train":
            assert "augmentation on the device, whole batches (augment.path)" in result.stdout
    return work


def test_every_stage_runs_with_the_fast_preset(fast_run):
    evaluation = json.loads((fast_run / "metrics/evaluate.json").read_text())
    assert evaluation["arch"] == "fast_net"
    for name in ("tta_hflip", "tta_translate"):
        assert 0 <= evaluation[name]["accuracy"] <= 1
    assert evaluation["accuracy"] > 0.2                       # it learns (chance is 0.1)
    assert json.loads((fast_run / "metrics/evaluate_run.json").read_text())["gradcam_layer"] == "groups.group3.conv1"
    assert (fast_run / "reports/report.md").exists()


def test_time_to_accuracy_plot_has_cumulative_seconds_per_epoch(fast_run):
    with open(fast_run / "plots/time_to_accuracy.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    seconds = [float(r["seconds"]) for r in rows]
    assert all(b > a > 0 for a, b in zip(seconds, seconds[1:]))
    speed = json.loads((fast_run / "metrics/train_speed.json").read_text())
    assert seconds[-1] == pytest.approx(sum(speed["epoch_seconds"]))
    curve = (fast_run / "metrics/train/plots/metrics/test/accuracy.tsv").read_text().splitlines()[1:]
    assert [float(r["accuracy"]) for r in rows] == [float(line.split("\t")[-1]) for line in curve]
