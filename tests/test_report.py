"""The report on a tiny synthetic run: every section, only links to files that exist, tables that
render on GitHub, and numbers equal to those in the metrics files."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from cifarlab import dvcfile, paths
from cifarlab.config.params import AugmentParams, ReportParams
from cifarlab.pipeline.report.sections import (SECTIONS, _anchor, augmentation, header, pct, result, run_table,
                                               training_curves)
from cifarlab.pipeline.report.summary import COPIED_FIGURES, RunIdentity, RunSummary, run_identity
from conftest import REPO, TINY, run, run_script


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
    assert headings == [part.heading for part in SECTIONS]
    assert report.startswith("# ")


def test_links_are_relative_and_point_at_files_that_exist(tiny, report):
    links = re.findall(r"\]\(([^)]+)\)", report)
    images = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", report)
    assert len(images) == 8
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
    outs = {path for name, stage in stages.items() if name != "report"
            for path in dvcfile.paths(stage, *dvcfile.OUT_KINDS)}
    for dep in deps:
        assert dep in outs or dep.startswith(("src/", "stages/")), dep
    assert report["params"] == ["report"]
    # every figure is a DVC plot: a top-level entry or a stage-level `plots:` out
    plots = {entry for entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"] if isinstance(entry, str)}
    plots |= {path for stage in stages.values() for path in dvcfile.paths(stage, "plots")}
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
    run_script(work, "stages/report.py")
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
    """The tiny run's train.max_lr is a number: no range test ran, and the section says so and how to run it."""
    assert read_json(tiny, paths.LR_FIND_METRICS)["ran"] is False
    text = section(report, "LR range test").strip()
    assert text.startswith("Not run: `train.max_lr` is a number, so nothing uses the range test")
    assert f"Training used **{TINY['train']['max_lr']:.3e}** (set by `train.max_lr`)" in text
    assert "`dvc exp run -S lr_find.when=always`" in text and "`train.max_lr: find`" in text
    assert "](figures/lr_find.png)" in text and not tables(text)
    with (tiny / paths.LR_SCHEDULE).open() as handle:
        lrs = [float(row["lr"]) for row in csv.DictReader(handle)]
    text = section(report, "LR schedule")
    assert f"{len(lrs)} steps" in text and f"peak of {max(lrs):.3e}" in text and f"ending at {lrs[-1]:.3e}" in text


def test_environment_and_wall_times_come_from_the_stages(tiny, report):
    speed, record = read_json(tiny, paths.TRAIN_SPEED), read_json(tiny, paths.EVAL_RUN)
    text = section(report, "Environment and wall times")
    runtime_table, times_table = tables(text)
    runtime = table_dict(runtime_table)
    for key in ("device", "precision", "channels_last", "threads"):
        assert runtime[key] == [str(speed[key]), str(record[key])]
    times = [row[1:] for row in times_table[1:]]
    assert ["throughput", f"{speed['images_per_second']:.1f} images/s"] in times
    assert ["whole stage", f"{record['seconds']['total']:.2f} s"] in times
    versions_table, = tables(section(report, "Appendix: library versions"))
    assert {"torch", "torchinfo", "dvc"} <= set(table_dict(versions_table))
    assert record["gradcam_layer"] in section(report, "Grad-CAM")


def test_params_section_is_the_run_params(tiny, report):
    block = re.search(r"```yaml\n(.*?)```", section(report, "Appendix: params"), flags=re.S).group(1)
    shown = yaml.safe_load(block)
    used = yaml.safe_load((tiny / "params.yaml").read_text())
    for name in ("data", "model", "augment", "optim", "lr_find", "train", "evaluate", "report"):
        assert shown[name] == used[name], name


def test_report_fails_in_one_line_when_an_output_is_missing(tiny, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tiny, work)
    for output in ("data", "reports"):            # the stage outputs, not src/cifarlab/data
        shutil.rmtree(work / output)
    (work / paths.EVAL_RUN).unlink()
    result = run_script(work, "stages/report.py", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and "evaluate_run.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (work / "reports").exists()


# --- which run, the write-up's figure, the augmentation preview (the tiny run) ---------------------

def test_first_screen_says_which_run_it_is(report):
    title, run_line, lead, contents = report.split("\n\n")[:4]
    assert title.startswith("# ")
    # the tiny run is `dvc repro` in a temporary repo (conftest.tiny_repo): the workspace, no experiment
    assert run_line.startswith("Run: workspace (not a DVC experiment), at ")
    assert "Its write-up reported 92.64% on CIFAR-10." in lead          # report.writeup_accuracy of the preset
    assert contents.startswith("[Result](#result) | [Run](#run) | [Augmentation](#augmentation)")


def test_augmentation_section_shows_the_train_stages_preview(tiny, report):
    assert (tiny / "reports/figures/augmentation.png").read_bytes() == (tiny / paths.AUGMENT_PREVIEW).read_bytes()
    augment = AugmentParams(**yaml.safe_load((tiny / "params.yaml").read_text())["augment"])
    text = section(report, "Augmentation")
    assert f"Every training image goes through {augment.describe()} (`augment.*`)" in text
    assert "![training images as stored and after random draws" in text


# --- each section alone, from a hand-built summary --------------------------------------------------

@pytest.fixture
def summary(tmp_path, default_params):
    """A small, self-consistent RunSummary written by hand: 2 classes, 4 test images, 2 epochs of 2 steps."""
    stage_figures = tmp_path / "stage_figures"
    stage_figures.mkdir()
    for figure in COPIED_FIGURES:
        (stage_figures / figure.name).write_bytes(b"\x89PNG " + figure.name.encode())
    history = {"train/loss": [1.2, 0.8], "train/accuracy": [0.5, 0.7], "test/loss": [1.0, 0.7],
               "test/accuracy": [0.5, 0.75], "lr": [1e-3, 1e-4]}
    return RunSummary(
        report=ReportParams(preset="assignment10", target_accuracy=0.9, writeup_accuracy=0.9264,
                            title="A10 by hand"),
        identity=RunIdentity("lr-1e-3", "abc1234"), run=default_params,
        evaluation={"accuracy": 0.75, "loss": 0.7, "correct": 3, "test_images": 4, "data_source": "cifar10",
                    "per_class_accuracy": {"cat": 1.0, "dog": 0.5}},
        evaluate_run={"device": "cpu", "precision": "fp32", "seconds": {"plain": 0.5, "gradcam": 0.2, "total": 2.0},
                      "images_per_second": 8.0, "gradcam_layer": "layer3", "gallery_images": 1, "gradcam_images": 1},
        lr_find={"ran": True, "iterations": 30, "window": [1e-5, 1e-2], "rule": "min_div_10", "max_lr": 1e-3,
                 "loss_minimum_lr": 1e-2, "suggestions": {"min_div_10": 1e-3, "steepest": 2e-3, "valley": 5e-4},
                 "minimum_at_end": False},
        training={"max_lr": 1.7e-3, "epochs": 2, "images_per_second": 100.0, "train_minutes": 0.09},
        speed={"device": "cpu", "precision": "fp32", "epoch_seconds": [3.0, 2.5], "epoch_seconds_mean": 2.75,
               "images_per_second": 100.0},
        history=history, lrs=[1e-4, 1.7e-3, 1e-3, 1e-4],
        finder_curve=([1e-5, 1e-4, 1e-3, 1e-2], [2.3, 2.0, 1.5, 3.0]), confusion=np.array([[2, 0], [1, 1]]),
        arch="custom_resnet", parameters=6_573_130, dropout=0.0, model_source="seed 002", model_table="(torchinfo)",
        last_epoch=2, max_lr=1.7e-3, checkpoint_mb=26.3, versions={"python": "3.11", "torch": "2.5"},
        figure_sources={figure.name: stage_figures / figure.name for figure in COPIED_FIGURES})


def render_alone(render, summary, tmp_path) -> tuple[str, Path]:
    figures = tmp_path / "figures"
    figures.mkdir(exist_ok=True)
    return render(summary, figures), figures


def test_every_section_renders_alone(summary, tmp_path):
    for part in SECTIONS:
        figures = tmp_path / _anchor(part.heading)
        figures.mkdir()
        text = part.render(summary, figures)
        assert text.strip() and not re.search(r"^#", text, flags=re.M), part.heading
        tables(text)                                                # well-formed, if any
        shown = re.findall(r"!\[[^\]]+\]\(figures/([^)]+)\)", text)
        assert sorted(shown) == sorted(p.name for p in figures.iterdir()), part.heading   # draws what it shows


def test_sections_are_one_list_in_report_order():
    headings = [part.heading for part in SECTIONS]
    assert len(set(headings)) == len(headings)
    assert headings[:3] == ["Result", "Run", "Augmentation"]
    assert headings[-3:] == ["Appendix: model summary", "Appendix: library versions", "Appendix: params"]
    assert [part.appendix for part in SECTIONS] == sorted(part.appendix for part in SECTIONS)   # appendix last


def test_header_links_every_section_once_in_order(summary):
    contents = header(summary).split("\n\n")[-1]
    assert re.findall(r"\(#([^)]+)\)", contents) == [part.anchor for part in SECTIONS]
    assert "<br>Appendix: [model summary](#appendix-model-summary)" in contents


@pytest.mark.parametrize("identity,line", [
    (RunIdentity("lr-1e-3", "abc1234"), "Run: experiment **lr-1e-3** (`dvc exp run`), from baseline commit `abc1234`."),
    (RunIdentity(None, "abc1234"), "Run: workspace (not a DVC experiment), at commit `abc1234`."),
    (RunIdentity(None, None, "no git revision (git is not installed)"),
     "Run: workspace (not a DVC experiment), at no git revision (git is not installed)."),
])
def test_header_says_which_run(summary, identity, line):
    assert header(dataclasses.replace(summary, identity=identity)).split("\n\n")[1] == line


def test_a_cut_down_budget_is_named_up_front_and_in_the_run_table(summary, tmp_path):
    assert "Preset **assignment10**: " in header(summary)                 # the full budget: nothing to say
    quick = dataclasses.replace(summary, run={**summary.run, "budget": {"name": "quick"}})
    assert "Preset **assignment10** at budget **quick** (a cut-down run: `conf/budget/quick.yaml`): " in header(quick)
    text, _ = render_alone(run_table, quick, tmp_path)
    assert table_dict(tables(text)[0])["budget"] == ["quick (`conf/budget/quick.yaml`)"]


def test_the_data_row_says_what_a_subset_left_of_each_split(summary, tmp_path):
    data = {**summary.run["data"], "train_subset": 320, "test_subset": 4}
    subset = dataclasses.replace(summary, run={**summary.run, "data": data})
    text, _ = render_alone(run_table, subset, tmp_path)
    [row] = table_dict(tables(text)[0])["data source"]
    assert row.endswith(": 320 of 50,000 (`data.train_subset`) train / 4 of 10,000 (`data.test_subset`) test images")
    text, _ = render_alone(run_table, summary, tmp_path)
    assert table_dict(tables(text)[0])["data source"][0].endswith(": 50,000 train / 10,000 test images")


def writeup_row(summary, tmp_path) -> str:
    text, _ = render_alone(result, summary, tmp_path)
    return table_dict(tables(text)[0])["the write-up's own result"][0]


def test_result_puts_the_writeups_figure_beside_the_target(summary, tmp_path):
    assert writeup_row(summary, tmp_path) == "92.64% (this run: -17.64 points)"
    assert "Its write-up reported 92.64%. " in header(summary)
    synthetic = dataclasses.replace(summary, evaluation={**summary.evaluation, "data_source": "synthetic"})
    assert writeup_row(synthetic, tmp_path) == "92.64% on CIFAR-10 (not comparable: this run's data is synthetic)"
    none = dataclasses.replace(summary, report=dataclasses.replace(summary.report, writeup_accuracy=None))
    assert writeup_row(none, tmp_path) == "none stated (`report.writeup_accuracy` is null)"
    assert "Its write-up states no test accuracy." in header(none)
    rounded = dataclasses.replace(summary, report=dataclasses.replace(summary.report, writeup_accuracy=0.82))
    assert writeup_row(rounded, tmp_path).startswith("82% (")          # no digits the write-up did not give


def test_wording_follows_the_augmentation(summary, tmp_path):
    off = dataclasses.replace(summary, run={**summary.run, "augment": {
        "pad": 0, "pad_mode": "reflect", "hflip": 0.0, "cutout_size": 8, "cutout_p": 0.0,
        "path": "per_image", "alternate_flip": False}})
    text, _ = render_alone(augmentation, off, tmp_path)
    assert text.startswith("No augmentation: augment.pad 0, augment.hflip 0, augment.cutout_p 0, so training sees")
    curves, _ = render_alone(training_curves, off, tmp_path)
    assert "augmented batches" not in curves and "not augmented" in curves
    assert "augmented batches" in render_alone(training_curves, summary, tmp_path)[0]
    assert render_alone(run_table, off, tmp_path)[0].count("| augmentation | none (augment.pad 0,") == 1


@pytest.mark.parametrize("augmented,label", [(True, "train (augmented, during the epoch)"),
                                             (False, "train (not augmented, during the epoch)"),
                                             (None, "train (during the epoch)")])
def test_curves_legend_says_augmented_only_when_it_was(summary, augmented, label):
    from cifarlab.pipeline.plots import curves_figure

    fig = curves_figure(summary.history, 0.9, train_augmented=augmented)
    assert [text.get_text() for text in fig.axes[0].get_legend().get_texts()][0] == label


def test_run_identity_from_dvcs_environment_and_git(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    run(["git", "init", "-q"], repo)
    run([*git, "commit", "-q", "--allow-empty", "-m", "one"], repo)
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    short = run(["git", "rev-parse", "--short", "HEAD"], repo).stdout.strip()
    assert run_identity({}, repo) == RunIdentity(None, short)                       # dvc repro: the workspace
    run([*git, "commit", "-q", "--allow-empty", "-m", "two"], repo)
    # dvc exp run: the experiment's name, and its baseline commit (not HEAD, which has moved on here)
    exp = run_identity({"DVC_EXP_NAME": "lr-1e-3", "DVC_EXP_BASELINE_REV": head}, repo)
    assert exp == RunIdentity("lr-1e-3", short)
    outside = tmp_path / "outside"
    outside.mkdir()
    assert run_identity({}, outside).revision is None                               # not a git repo: no crash
    assert "not in a git repository" in run_identity({}, outside).describe()
    monkeypatch.setenv("PATH", str(outside))                                        # no git at all
    assert run_identity({}, repo).describe() == ("workspace (not a DVC experiment), at no git revision "
                                                 "(git is not installed)")
    assert run_identity({"DVC_EXP_NAME": "x", "DVC_EXP_BASELINE_REV": head}, repo).revision == head[:7]


def test_result_states_the_time_to_the_target_and_every_tta_figure(summary, tmp_path):
    rows = lambda s: table_dict(tables(render_alone(result, s, tmp_path)[0])[0])   # noqa: E731
    assert rows(summary)["time to the target"][0] == "not reached in 5.50 s of training (best 75.00%)"
    reached = dataclasses.replace(summary, report=dataclasses.replace(summary.report, target_accuracy=0.7))
    assert rows(reached)["time to the target"][0] == "epoch 2, after 5.50 s of training"
    early = dataclasses.replace(summary, report=dataclasses.replace(summary.report, target_accuracy=0.5))
    assert rows(early)["time to the target"][0] == "epoch 1, after 3.00 s of training"
    with_tta = dataclasses.replace(summary, evaluation={
        **summary.evaluation, "tta_hflip": {"accuracy": 0.75, "loss": 0.65, "correct": 3},
        "tta_translate": {"accuracy": 1.0, "loss": 0.6, "correct": 4}})
    shown = rows(with_tta)
    assert shown["test accuracy, horizontal-flip TTA"][0] == "75.00% (3 / 4)"
    assert shown["test accuracy, flip + translate TTA (6 views)"][0] == "100.00% (4 / 4)"
    assert shown["test loss, flip + translate TTA (6 views)"][0] == "0.6000"


# --- the LR range test's wording, the title, the curves' target line (issue 26) ---------------------

def lr_text(s, tmp_path) -> tuple[str, dict]:
    from cifarlab.pipeline.report.sections import lr_range_test

    text, figures = render_alone(lr_range_test, s, tmp_path)
    assert (figures / "lr_find.png").is_file()
    return text, (table_dict(tables(text)[0]) if tables(text) else {})


def with_max_lr(summary, max_lr, trained: float, **lr_find):
    run = {**summary.run, "train": {**summary.run["train"], "max_lr": max_lr}}
    return dataclasses.replace(summary, run=run, max_lr=trained, lr_find={**summary.lr_find, **lr_find})


def test_lr_section_places_the_lr_used_against_the_range_test(summary, tmp_path):
    found, _ = lr_text(with_max_lr(summary, "find", 1e-3), tmp_path)
    assert "Training used **1.000e-03** (lr_find's `min_div_10` suggestion), start LR" in found
    assert "the loss minimum at 1.000e-02 is never used (training there diverges)" in found
    above, rows = lr_text(with_max_lr(summary, 1.5, 1.5, loss_minimum_lr=1.0), tmp_path)
    assert ("Training used **1.500e+00**, above the range test's loss minimum at 1.000e+00 (set by `train.max_lr`)"
            in above)
    assert rows["**chosen**: used for training"] == ["**1.500e+00**", "set in params (`train.max_lr`)"]
    below, _ = lr_text(summary, tmp_path)             # the fixture's 1.7e-3 against a minimum at 1e-2
    assert "Training used **1.700e-03**, below the range test's loss minimum at 1.000e-02" in below


def test_a_minimum_at_the_sweeps_end_is_not_called_diverging(summary, tmp_path):
    at_end = with_max_lr(summary, 1.5, 1.5, loss_minimum_lr=1.0, window=[1e-5, 1.0], minimum_at_end=True)
    text, rows = lr_text(at_end, tmp_path)
    assert ("the curve still falls at the end of the sweep: its lowest point, at 1.000e+00, is only where the sweep "
            "ended, not where the loss turns up, so the rules may answer low: raise `lr_find.end_lr`") in text
    assert "training there diverges" not in text and "never used" not in text
    assert ("Training used **1.500e+00**, above the range test's lowest point at 1.000e+00 (set by `train.max_lr`)"
            in text)
    assert rows["lowest point: the sweep's end"] == ["1.000e+00", ""] and "loss minimum (never used)" not in rows


def test_a_range_test_that_was_not_run_is_named_with_how_to_run_it(summary, tmp_path):
    from cifarlab.pipeline.lr_find import NOT_RUN

    skipped = dataclasses.replace(summary, lr_find=dict(NOT_RUN), finder_curve=([], []))
    text, rows = lr_text(skipped, tmp_path)
    assert text.startswith("Not run: `train.max_lr` is a number, so nothing uses the range test (`lr_find.when: "
                           "find`). Training used **1.700e-03** (set by `train.max_lr`)")
    assert "set `lr_find.when: always` (`dvc exp run -S lr_find.when=always`)" in text and rows == {}


def test_the_title_counts_the_epochs_that_ran(summary):
    fast = dataclasses.replace(summary, report=dataclasses.replace(
        summary.report, title="fast - airbench94's whitened convnet in {epochs} epochs (TTA)"))
    assert header(fast).split("\n\n")[0] == "# fast - airbench94's whitened convnet in 2 epochs (TTA)"
    assert header(summary).split("\n\n")[0] == "# A10 by hand"          # a title without `{epochs}` stays as it is


def test_the_curves_draw_the_target_line_only_when_the_run_is_judged(summary, tmp_path, monkeypatch):
    from cifarlab.pipeline import plots
    from cifarlab.pipeline.report import sections

    drawn = []
    monkeypatch.setattr(sections, "curves_figure", lambda history, target, **kw: drawn.append(target) or
                        plots.curves_figure(history, target, **kw))
    judged, _ = render_alone(training_curves, summary, tmp_path)
    synthetic = dataclasses.replace(summary, evaluation={**summary.evaluation, "data_source": "synthetic"})
    assert not synthetic.judged and "not judged" in render_alone(result, synthetic, tmp_path)[0]
    unjudged, _ = render_alone(training_curves, synthetic, tmp_path)
    assert drawn == [0.9, None]
    assert "the dashed line is the target" in judged and "no target line: not judged" in unjudged
    labels = lambda fig: [t.get_text() for t in fig.axes[1].get_legend().get_texts()]   # noqa: E731
    assert "target 90%" in labels(plots.curves_figure(summary.history, 0.9))
    assert not [label for label in labels(plots.curves_figure(summary.history, None)) if "target" in label]
