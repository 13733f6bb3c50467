"""Every stage running with the `fast` preset on the tiny synthetic set (batch augmentation on the
device, lookahead, bias LR scale, both TTA figures, the time-to-accuracy plot, Grad-CAM at fast_net's
layer), and under two-process DDP through the frozen whitening bias."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import TINY, copy_code, merge, run_script, write_params
from test_fast_preset import fast

# The fast preset on the tiny set; its whitening bias stops training after epoch 2 of 3.
FAST_RUN = merge(TINY, {"train": {"batch_size": 64, "max_lr": 0.5, "epochs": 3}, "optim": {"whiten_bias_epochs": 2},
                        "evaluate": {"gradcam_size": 2, "gallery_size": 2}})


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("fast_run") / "work"
    copy_code(work)
    write_params(work, merge(fast(), FAST_RUN))
    for stage in ("download", "lr_find", "train", "evaluate", "report"):   # a numeric max_lr: no max_lr stage needed
        result = run_script(work, f"stages/{stage}.py")
        if stage == "train":
            assert "augmentation on the device, whole batches (augment.path)" in result.stdout
            assert "whitening bias trained for 2 epochs (optim.whiten_bias_epochs)" in result.stdout
    return work


@pytest.mark.e2e
def test_two_process_ddp_runs_the_fast_preset_through_the_frozen_bias(tmp_path):
    """Under DDP the whitening bias stops getting gradients in epoch 2: DDP is told to expect that."""
    work = tmp_path / "work"
    copy_code(work)
    write_params(work, merge(fast(), merge(FAST_RUN, {"train": {"epochs": 2}, "optim": {"whiten_bias_epochs": 1},
                                                      "runtime": {"nproc": 2}})))
    run_script(work, "stages/download.py")          # a numeric max_lr: train needs no range test
    result = run_script(work, "stages/train.py")
    assert "2 processes" in result.stdout and result.stdout.count("epoch   2") == 1


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
