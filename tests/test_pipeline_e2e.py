"""End to end: the real `dvc repro` / `dvc exp run` / `dvc plots diff` in a temporary git copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, merge, run, write_params

pytestmark = pytest.mark.e2e

COPIED = ("dvc.yaml", "params.yaml", "conf", "stages", "src", "pyproject.toml", ".dvc/config", ".dvc/plots",
          ".dvcignore", ".gitignore")
OVERRIDE_CONFIG = "test_overrides"   # conf/test_overrides.yaml in the temporary repo


def add_overrides_to_conf(work: Path, override: dict) -> None:
    """Make `dvc exp run`'s Hydra composition keep `override` in the temporary repo.

    With hydra enabled, `dvc exp run` rewrites params.yaml from conf/, so the tiny settings must
    be in conf/ as well. Merging them into the base (conf/config.yaml) is not enough: the preset
    is composed after the base and sets train.* itself. So they are a config of their own, listed
    in conf/config.yaml's defaults after the preset: every composition, whichever preset it
    picks, keeps them, and `-S` on the command line still wins over them.
    """
    config_path = work / "conf" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["defaults"] = [*config["defaults"], OVERRIDE_CONFIG]
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    (work / "conf" / f"{OVERRIDE_CONFIG}.yaml").write_text(
        "# @package _global_\n" + yaml.safe_dump(override, sort_keys=False))


def make_repo(tmp_path: Path, override: dict) -> Path:
    """A fresh git + DVC repo holding the pipeline, with tiny synthetic params committed (in
    params.yaml for `dvc repro`, and in conf/ for the composition `dvc exp run` makes)."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)
    write_params(work, merge(yaml.safe_load((REPO / "params.yaml").read_text()), override))
    add_overrides_to_conf(work, override)
    run(["git", "init", "-q"], work)
    run(["git", "config", "user.email", "test@example.com"], work)
    run(["git", "config", "user.name", "test"], work)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "tiny pipeline"], work)
    return work


def declared_outputs(work: Path) -> list[Path]:
    stages = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
    outs = []
    for stage in stages.values():
        for out in [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]:
            outs.append(work / (next(iter(out)) if isinstance(out, dict) else out))
    return outs


def exp_rows(shown: list) -> dict:
    """`dvc exp show --json` -> {experiment name: its data (params, metrics)}."""
    rows = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                rows[rev.get("name") or rev["rev"]] = rev["data"]
    return rows


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One `dvc repro` of the tiny pipeline, committed as the baseline."""
    work = make_repo(tmp_path_factory.mktemp("e2e"), TINY)
    result = run(["dvc", "repro"], work)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "baseline run"], work)
    return work, result.stdout


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
    assert lr_find["max_lr"] < lr_find["loss_minimum_lr"]
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


def test_exp_run_with_new_max_lr_reruns_only_downstream(pipeline):
    work, _ = pipeline
    result = run(["dvc", "exp", "run", "-n", "lower-lr", "-S", "train.max_lr=0.001"], work)
    assert ran_stages(result.stdout) == {"max_lr", "train", "evaluate", "report"}
    # DVC tells the stages of `dvc exp run` the experiment's name and baseline (DVC_EXP_NAME, DVC_EXP_BASELINE_REV)
    baseline = run(["git", "rev-parse", "--short", "HEAD"], work).stdout.strip()
    report = (work / "reports/report.md").read_text()
    assert f"\n\nRun: experiment **lower-lr** (`dvc exp run`), from baseline commit `{baseline}`.\n\n" in report
    shown = run(["dvc", "exp", "show", "--json"], work).stdout
    assert "lower-lr" in shown

    metrics = run(["dvc", "metrics", "show", "--json"], work).stdout
    assert "accuracy" in metrics
    diff = run(["dvc", "metrics", "diff", "HEAD", "lower-lr", "--json"], work)
    assert diff.returncode == 0

    out = work / "plots_diff"
    run(["dvc", "plots", "diff", "HEAD", "lower-lr", "-o", str(out)], work)
    html = (out / "index.html").read_text()
    assert "lower-lr" in html and "Accuracy per epoch" in html
    assert "plots/augmentation.png" in html           # the train stage's augmentation preview, per revision


def test_report_params_rerun_only_report(pipeline):
    work, _ = pipeline
    # With Hydra, `-S` changes the composition of conf/, not the workspace's params.yaml: start
    # from the committed baseline, whatever experiment an earlier test left in the workspace.
    run(["git", "checkout", "--", "."], work)
    run(["dvc", "checkout"], work)
    result = run(["dvc", "exp", "run", "-S", "report.target_accuracy=0.5"], work)
    assert ran_stages(result.stdout) == {"report"}
