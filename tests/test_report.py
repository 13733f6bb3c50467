"""The report on a tiny synthetic run: every section, only links to files that exist, tables that
render on GitHub, and numbers equal to those in the metrics files."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from cifarlab import paths
from cifarlab.report import COPIED_FIGURES, SECTIONS, pct
from conftest import REPO, TINY, run


@pytest.fixture(scope="module")
def tiny(tiny_run) -> Path:
    """The five stages run on the tiny synthetic set (conftest.tiny_run), TTA on."""
    return tiny_run


@pytest.fixture(scope="module")
def report(tiny) -> str:
    return (tiny / "reports/report.md").read_text()


def read_json(work: Path, path: Path) -> dict:
    return json.loads((work / path).read_text())


# --- markdown helpers -----------------------------------------------------------------------------

def section(report: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", report, flags=re.M | re.S)
    assert match, f"no section {heading!r}"
    return match.group(1)


def tables(text: str) -> list[list[list[str]]]:
    """Every GitHub table in `text` as rows of cells, the header first, the separator row dropped."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif current:
            found.append(current)
            current = []
    for table in found:
        assert all(re.fullmatch(r"-{3,}", cell) for cell in table[1]), f"no separator row: {table[:2]}"
        assert all(len(row) == len(table[0]) for row in table), f"ragged table: {table[0]}"
    return [[table[0]] + table[2:] for table in found]


def table_dict(table: list[list[str]]) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in table[1:]}


def history(work: Path) -> dict[str, list[float]]:
    root = work / "metrics/train/plots/metrics"
    series = {}
    for name in ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr"):
        with (root / f"{name}.tsv").open() as handle:
            rows = sorted(csv.DictReader(handle, delimiter="\t"), key=lambda row: int(row["step"]))
        series[name] = [float(row[name.rsplit("/", 1)[-1]]) for row in rows]
    return series


# --- structure ------------------------------------------------------------------------------------

def test_every_section_in_order(report):
    headings = re.findall(r"^## (.+)$", report, flags=re.M)
    assert headings == list(SECTIONS)
    assert report.startswith("# ")


def test_links_are_relative_and_point_at_files_that_exist(tiny, report):
    links = re.findall(r"\]\(([^)]+)\)", report)
    images = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", report)
    assert len(images) == 7
    anchors = {re.sub(r"[^a-z0-9_-]", "", h.lower().replace(" ", "-")) for h in re.findall(r"^## (.+)$", report, re.M)}
    for link in links:
        if link.startswith("#"):
            assert link[1:] in anchors, link
            continue
        assert not link.startswith(("/", "http:", "https:", "file:")) and ".." not in link, link
        assert (tiny / "reports" / link).is_file(), link
    figures = {p.name for p in (tiny / "reports/figures").iterdir()}
    assert figures == {Path(link).name for link in images}          # nothing missing, nothing orphaned
    assert {p.name for p in COPIED_FIGURES} | {"lr_find.png", "lr_schedule.png", "curves.png"} == figures
    assert str(tiny) not in report                                  # no absolute paths of this machine


def test_figures_are_pngs(tiny):
    from PIL import Image

    for figure in (tiny / "reports/figures").iterdir():
        with Image.open(figure) as image:
            assert image.format == "PNG" and min(image.size) > 100, figure.name


def test_report_is_declared_from_the_other_stages_outputs_only():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    report = stages["report"]
    deps = set(report["deps"])
    read = [paths.EVAL_METRICS, paths.EVAL_RUN, paths.LR_FIND_METRICS, paths.LR_FIND_CURVE, paths.TRAIN_SPEED,
            paths.TRAIN_LIVE_DIR, paths.LR_SCHEDULE, paths.CONFUSION, paths.CHECKPOINT, *COPIED_FIGURES]
    assert {p.as_posix() for p in read} <= deps
    outs = {next(iter(out)) if isinstance(out, dict) else out
            for name, stage in stages.items() if name != "report"
            for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])}
    for dep in deps:
        assert dep in outs or dep.startswith(("src/", "stages/")), dep
    assert report["params"] == ["report"]
    # every figure is a DVC plot: a top-level entry or a stage-level `plots:` out
    plots = {entry for entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"] if isinstance(entry, str)}
    plots |= {next(iter(out)) if isinstance(out, dict) else out for stage in stages.values()
              for out in stage.get("plots", [])}
    assert {p.as_posix() for p in COPIED_FIGURES} | {"reports/figures/lr_find.png"} <= plots


# --- numbers equal to the metrics files -------------------------------------------------------------

def test_result_matches_evaluate_metrics(tiny, report):
    metrics = read_json(tiny, paths.EVAL_METRICS)
    params = yaml.safe_load((tiny / "params.yaml").read_text())["report"]
    result = table_dict(tables(section(report, "Result"))[0])
    n = metrics["test_images"]
    assert result["test accuracy"] == [f"**{pct(metrics['accuracy'])}** ({metrics['correct']:,} / {n:,})"]
    assert result["test loss (mean cross-entropy)"] == [f"{metrics['loss']:.4f}"]
    tta = metrics["tta_hflip"]
    assert result["test accuracy, horizontal-flip TTA"] == [f"{pct(tta['accuracy'])} ({tta['correct']:,} / {n:,})"]
    assert result["test loss, horizontal-flip TTA"] == [f"{tta['loss']:.4f}"]
    assert result[f"target accuracy ({params['preset']})"] == [pct(params["target_accuracy"])]
    # The target belongs to CIFAR-10: on synthetic data "met / not met" is not a result.
    assert result["target"] == ["not judged: synthetic data (the target belongs to CIFAR-10)"]
    assert "not judged: the data is **synthetic**" in report and "**met**" not in report
    assert f"**{pct(metrics['accuracy'])}** test accuracy" in report


def test_on_cifar10_the_target_is_judged(tiny, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tiny, work)
    metrics = read_json(work, paths.EVAL_METRICS)
    (work / paths.EVAL_METRICS).write_text(json.dumps({**metrics, "data_source": "cifar10"}))
    run(["python", "stages/report.py"], work)
    result = table_dict(tables(section((work / "reports/report.md").read_text(), "Result"))[0])
    target = yaml.safe_load((work / "params.yaml").read_text())["report"]["target_accuracy"]
    met = metrics["accuracy"] >= target
    assert result["target"][0].startswith("**met**" if met else "**not met**")


def test_per_epoch_table_matches_the_training_logs(tiny, report):
    logged, speed = history(tiny), read_json(tiny, paths.TRAIN_SPEED)
    n = read_json(tiny, paths.EVAL_METRICS)["test_images"]
    rows = tables(section(report, "Per-epoch log"))[0][1:]
    assert len(rows) == TINY["train"]["epochs"] == len(logged["train/loss"])
    for e, row in enumerate(rows):
        assert row == [str(e + 1), f"{logged['lr'][e]:.3e}", f"{logged['train/loss'][e]:.4f}",
                       pct(logged["train/accuracy"][e]), f"{logged['test/loss'][e]:.4f}",
                       pct(logged["test/accuracy"][e]), f"{round(logged['test/accuracy'][e] * n):,}/{n:,}",
                       f"{speed['epoch_seconds'][e]:.1f}"]
    # the last epoch's test figures are the evaluate stage's: same model, same split
    assert rows[-1][5] == pct(read_json(tiny, paths.EVAL_METRICS)["accuracy"])


def test_per_class_table_matches_metrics_and_confusion(tiny, report):
    metrics = read_json(tiny, paths.EVAL_METRICS)
    classes = list(metrics["per_class_accuracy"])
    with (tiny / paths.CONFUSION).open() as handle:
        pairs = [(row["actual"], row["predicted"]) for row in csv.DictReader(handle)]
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for actual, predicted in pairs:
        matrix[classes.index(actual), classes.index(predicted)] += 1
    rows = tables(section(report, "Per-class test accuracy"))[0][1:]
    assert [row[0] for row in rows] == classes
    for i, (name, images, correct, accuracy, _) in enumerate(rows):
        assert (int(images.replace(",", "")), int(correct.replace(",", ""))) == (matrix[i].sum(), matrix[i, i])
        assert accuracy == pct(metrics["per_class_accuracy"][name])
    assert sum(int(row[2].replace(",", "")) for row in rows) == metrics["correct"]


def test_lr_sections_match_lr_find_and_the_schedule(tiny, report):
    lr_find = read_json(tiny, paths.LR_FIND_METRICS)
    rows = table_dict(tables(section(report, "LR range test"))[0])
    for rule, lr in lr_find["suggestions"].items():
        assert rows[f"`{rule}`"] == [f"{lr:.3e}", "`lr_find.rule`" if rule == lr_find["rule"] else ""]
    assert rows["loss minimum (never used)"][0] == f"{lr_find['loss_minimum_lr']:.3e}"
    # "chosen" is what training used: here the params' number, not the rule's suggestion
    assert rows["**chosen**: used for training"] == [f"**{TINY['train']['max_lr']:.3e}**",
                                                     "set in params (`train.max_lr`)"]
    low, high = lr_find["window"]
    assert f"({low:.2e} .. {high:.2e}, shaded in the figure)" in section(report, "LR range test")
    with (tiny / paths.LR_SCHEDULE).open() as handle:
        lrs = [float(row["lr"]) for row in csv.DictReader(handle)]
    text = section(report, "LR schedule")
    assert f"{len(lrs)} steps" in text and f"peak of {max(lrs):.3e}" in text and f"ending at {lrs[-1]:.3e}" in text


def test_environment_and_wall_times_come_from_the_stages(tiny, report):
    speed, record = read_json(tiny, paths.TRAIN_SPEED), read_json(tiny, paths.EVAL_RUN)
    text = section(report, "Environment and wall times")
    runtime_table, times_table, versions_table = tables(text)
    runtime = table_dict(runtime_table)
    for key in ("device", "precision", "channels_last", "threads"):
        assert runtime[key] == [str(speed[key]), str(record[key])]
    times = [row[1:] for row in times_table[1:]]
    assert ["throughput", f"{speed['images_per_second']:.1f} images/s"] in times
    assert ["whole stage", f"{record['seconds']['total']:.2f} s"] in times
    assert {"torch", "grad-cam", "dvc"} <= set(table_dict(versions_table))
    assert record["gradcam_layer"] in section(report, "Grad-CAM")


def test_params_section_is_the_run_params(tiny, report):
    block = re.search(r"```yaml\n(.*?)```", section(report, "Params"), flags=re.S).group(1)
    shown = yaml.safe_load(block)
    used = yaml.safe_load((tiny / "params.yaml").read_text())
    for name in ("data", "model", "augment", "optim", "lr_find", "train", "evaluate", "report"):
        assert shown[name] == used[name], name


def test_report_fails_in_one_line_when_an_output_is_missing(tiny, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tiny, work, ignore=shutil.ignore_patterns("data", "reports"))
    (work / paths.EVAL_RUN).unlink()
    result = run(["python", "stages/report.py"], work, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and "evaluate_run.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (work / "reports").exists()
