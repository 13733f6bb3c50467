"""End to end: the real `dvc repro` / `dvc exp run` / `dvc plots diff` in a temporary git copy."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, copy_repo, declared_outputs, ran_stages, run

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def pipeline(tiny_repo, tmp_path_factory):
    """One `dvc repro` of the tiny pipeline, committed as the baseline (a copy of conftest.tiny_repo,
    which these tests change)."""
    work, output = tiny_repo
    return copy_repo(work, tmp_path_factory.mktemp("e2e") / "repo"), output


def test_repro_runs_every_stage_and_writes_every_output(pipeline):
    work, output = pipeline
    assert ran_stages(output) == {"download", "lr_find", "max_lr", "train", "evaluate", "report"}
    missing = [str(p.relative_to(work)) for p in declared_outputs(work) if not p.exists()]
    assert missing == []


def test_synthetic_run_learns_well_above_chance(pipeline):
    work, _ = pipeline
    evaluation = json.loads((work / "metrics/evaluate.json").read_text())
    assert evaluation["split"] == "test" and evaluation["test_images"] == TINY["data"]["synthetic_test_size"]
    assert evaluation["data_source"] == "synthetic"
    assert evaluation["accuracy"] > 0.3          # chance is 0.1


def test_outputs_are_consistent(pipeline):
    work, _ = pipeline
    lr_find = json.loads((work / "metrics/lr_find.json").read_text())
    assert lr_find["ran"] is False                    # a numeric train.max_lr: no range test (tests/test_lr_finder.py)
    lrs = [float(line.split(",")[1]) for line in (work / "plots/lr_schedule.csv").read_text().splitlines()[1:]]
    steps_per_epoch = TINY["data"]["synthetic_train_size"] // TINY["train"]["batch_size"]
    assert len(lrs) == TINY["train"]["epochs"] * steps_per_epoch       # stepped every batch
    assert max(lrs) == pytest.approx(TINY["train"]["max_lr"])
    assert lrs.index(max(lrs)) == TINY["train"]["max_at_epoch"] * steps_per_epoch - 1
    report = (work / "reports/report.md").read_text()
    accuracy = json.loads((work / "metrics/evaluate.json").read_text())["accuracy"]
    assert f"{100 * accuracy:.2f}%" in report and "not judged: the data is **synthetic**" in report
    # `dvc repro` ran before the baseline commit: the report names the workspace and the commit it ran on
    ran_on = run(["git", "rev-parse", "--short", "HEAD~1"], work).stdout.strip()
    assert f"\n\nRun: workspace (not a DVC experiment), at commit `{ran_on}`.\n\n" in report


def test_noop_repro_runs_nothing(pipeline):
    work, _ = pipeline
    assert ran_stages(run(["dvc", "repro"], work).stdout) == set()


# `dvc exp run -S train.max_lr=...` reruns max_lr and what follows: test_experiments.py, on its three runs.


def test_report_params_rerun_only_report(pipeline):
    work, _ = pipeline
    # With Hydra, `-S` changes the composition of conf/, not the workspace's params.yaml: start
    # from the committed baseline, whatever experiment an earlier test left in the workspace.
    run(["git", "checkout", "--", "."], work)
    run(["dvc", "checkout"], work)
    result = run(["dvc", "exp", "run", "-S", "report.target_accuracy=0.5"], work)
    assert ran_stages(result.stdout) == {"report"}
