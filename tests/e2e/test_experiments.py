"""End to end, the experiment loop: a `dvc exp show` that fits a screen, `dvc plots diff` pages that
render offline in a real browser, seeds compared with error bars, and git never taking in the
DVC-cached outputs, even after a failed stage."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from cifarlab import dvcfile
from conftest import REPO, TINY_RUN, exp_rows, make_repo, merge, ran_stages, run, tool_env, wait_for_queue

pytestmark = pytest.mark.e2e

# Two epochs, so the per-epoch curves are lines; TTA on, so its two columns must fit as well. The
# small network of assignment 7: these runs check DVC's plumbing, and each step of it costs a
# fraction of the default network's.
TINY_EXP = merge(TINY_RUN, {"model": {"name": "a7_net"}, "train": {"epochs": 2}, "evaluate": {"tta_hflip": True}})
MAX_LRS = ("0.005",)   # one variant: with the baseline, what --only-changed shows differs
VARIANT = f"lr-{MAX_LRS[0]}"
SEEDS = (2, 3)    # the baseline ran seed 1
WIDTH = 160
SHOW = ["dvc", "exp", "show", "--only-changed", "--no-pager"]
DROP_PATHS = ["--drop", ".*/|State|Executor"]   # the data-file hash columns and the queue's, as the README says
# Only the figures a user compares, each once (the test split's, the TTA ones beside them; the LR
# training used, epochs, speed and minutes), and the params: no per-class figures, no run details.
DECLARED = {"accuracy", "loss", "tta_hflip.accuracy", "tta_hflip.loss", "max_lr", "epochs",
            "images_per_second", "train_minutes"}
CACHED_OUTS = ("data", "models", "metrics/train/", "metrics/evaluate.json", "metrics/evaluate_run.json",
               "metrics/lr_find.json", "metrics/max_lr.json", "metrics/train_speed.json", "reports/")


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    """The tiny pipeline committed as a baseline; a train.max_lr variant run as a user would (its
    output and report, and then `dvc exp show`, recorded), then two seeds of the baseline's configuration
    through DVC's queue, as the README documents for seeds (one group here, to stay tiny)."""
    work = make_repo(tmp_path_factory.mktemp("experiments"), TINY_EXP)
    run(["dvc", "repro"], work)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "baseline run"], work)
    exp_runs = {}
    for lr in MAX_LRS:
        output = run(["dvc", "exp", "run", "-n", f"lr-{lr}", "-S", f"train.max_lr={lr}"], work).stdout
        exp_runs[f"lr-{lr}"] = {"output": output, "report": (work / "reports/report.md").read_text()}
    env = tool_env() | {"COLUMNS": str(WIDTH), "TERM": "dumb"}
    shown = {"table": subprocess.run([*SHOW, *DROP_PATHS], cwd=work, env=env, capture_output=True, text=True,
                                     check=True).stdout,
             "csv": run([*SHOW, *DROP_PATHS, "--csv"], work).stdout, "exp runs": exp_runs}

    run(["dvc", "exp", "run", "--queue", "-S", f"train.seed=range({SEEDS[0]},{SEEDS[-1] + 1})"], work)
    started = time.monotonic()
    # Not waited for with a pipe: the worker it starts may outlive it and would hold the pipe open.
    subprocess.run(["dvc", "queue", "start", "--jobs", "2"], cwd=work, env=tool_env() | {"OMP_NUM_THREADS": "1"},
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    try:
        tasks = wait_for_queue(work, timeout=900)
    finally:
        run(["dvc", "queue", "stop"], work, check=False)
    print(f"queue of {len(SEEDS)} experiments, 2 jobs: {time.monotonic() - started:.1f} s")
    logs = {row[0]: run(["dvc", "queue", "logs", row[0]], work, check=False).stdout for row in tasks}
    failed = [row for row in tasks if row[-1] != "Success"]
    assert not failed, "\n".join(logs[row[0]][-3000:] for row in failed)
    return work, shown | {"queue logs": logs}


def flat_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        keys += flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def test_exp_show_columns_are_the_declared_few(experiments):
    experiments, _ = experiments
    rows = exp_rows(json.loads(run(["dvc", "exp", "show", "--json"], experiments).stdout))
    assert len(rows) == len(MAX_LRS) + len(SEEDS)
    for name, data in rows.items():
        names = [key for metrics in data["metrics"].values() for key in flat_keys(metrics["data"])]
        assert sorted(names) == sorted(DECLARED), name     # each once: no `test.accuracy`, no second `max_lr`
    header = run(["dvc", "exp", "show", "--csv"], experiments).stdout.splitlines()[0].split(",")
    assert not [column for column in header if ":" in column]   # no name needed its file to tell it apart


def test_exp_run_with_new_max_lr_reruns_only_downstream(experiments):
    """Each `dvc exp run -S train.max_lr=...` ran max_lr and the stages after it, and lr_find (a param
    of it: with a number a no-op), nothing else upstream;
    DVC told the stages the experiment's name and baseline (DVC_EXP_NAME, DVC_EXP_BASELINE_REV), and
    the report says which run it is."""
    work, shown = experiments
    baseline = run(["git", "rev-parse", "--short", "HEAD"], work).stdout.strip()
    for name, ran in shown["exp runs"].items():
        assert ran_stages(ran["output"]) == {"lr_find", "max_lr", "train", "evaluate", "report"}, name   # lr_find: a no-op
        assert f"\n\nRun: experiment **{name}** (`dvc exp run`), from baseline commit `{baseline}`.\n\n" in ran["report"]
    assert "accuracy" in run(["dvc", "metrics", "show", "--json"], work).stdout
    assert run(["dvc", "metrics", "diff", "HEAD", VARIANT, "--json"], work).returncode == 0


def test_queued_experiments_run_in_parallel_and_show_up(experiments):
    """The two seeds went through DVC's queue, two workers at once: each took the data from the DVC
    cache (dvc.lock pins it) and ran training on; each shows up with its own params and metrics."""
    work, shown = experiments
    for log in shown["queue logs"].values():
        assert "Stage 'download' didn't change, skipping" in log      # the queued copies did not re-download
        assert {"train", "evaluate", "report"} <= ran_stages(log)
    rows = exp_rows(json.loads(run(["dvc", "exp", "show", "--json"], work).stdout))
    queued = {data["params"]["params.yaml"]["data"]["train"]["seed"]: data for name, data in rows.items()
              if not name.startswith("lr-")}
    assert sorted(queued) == list(SEEDS)
    for data in queued.values():
        assert 0.0 <= data["metrics"]["metrics/test.json"]["data"]["accuracy"] <= 1.0
        training = data["metrics"]["metrics/training.json"]["data"]
        assert training["images_per_second"] > 0 and training["max_lr"] == TINY_EXP["train"]["max_lr"]


def test_exp_show_only_changed_fits_160_columns(experiments):
    """The train.max_lr variant beside the baseline: every column whole, the table within 160 columns.
    The data-file columns (a hash per upstream file, 32+ characters each) are dropped as the README
    says; the metrics and params are what is compared."""
    _, shown = experiments
    names = [f"lr-{lr}" for lr in MAX_LRS]
    csv_out = shown["csv"].splitlines()
    header = csv_out[0].split(",")
    assert sorted(line.split(",")[0] for line in csv_out[1:] if line.split(",")[0]) == names
    # What varies across these runs, TTA included, and nothing else.
    assert set(header) - {"Experiment", "rev", "typ", "Created"} == {
        "max_lr", "train.max_lr", "accuracy", "loss", "tta_hflip.accuracy", "tta_hflip.loss",
        "images_per_second", "train_minutes"}
    table = shown["table"]
    lines = [line.rstrip() for line in table.splitlines() if line.strip()]
    print(f"`COLUMNS={WIDTH} dvc exp show --only-changed --drop '.*/|State|Executor'`: {max(map(len, lines))} characters wide, "
          f"{len(header) - 2} columns")
    print(table)
    assert max(map(len, lines)) <= WIDTH
    assert "…" not in table and "..." not in table           # no column collapsed or cut
    title = next(line for line in lines if "Experiment" in line)
    for column in [h for h in header if h not in ("rev", "typ")]:
        assert column in title.split(), column
    for name in names:
        assert name in table


def test_the_experiments_table_fits_100_columns_best_first(experiments):
    """`python -m cifarlab exps` at COLUMNS=100: every experiment once, what identifies it first."""
    work, _ = experiments
    result = subprocess.run(["python", "-m", "cifarlab", "exps"], cwd=work, env=tool_env() | {"COLUMNS": "100"},
                            capture_output=True, text=True, check=True)
    print(result.stdout)
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 100
    assert lines[0].split()[:5] == ["experiment", "preset", "budget", "seed", "data"]
    rows = lines[1:1 + len(MAX_LRS) + len(SEEDS)]
    accuracies = [float(line.split()[5]) for line in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert {line.split()[0] for line in rows} >= {f"lr-{lr}" for lr in MAX_LRS}
    assert lines[len(rows) + 1].startswith(f"best: {rows[0].split()[0]}, ")


def test_plots_diff_page_loads_no_network_library(experiments, tmp_path):
    experiments, _ = experiments
    out = tmp_path / "plots"
    run(["dvc", "plots", "diff", "HEAD", VARIANT, "-o", str(out)], experiments)
    html = (out / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=", html)          # every script inline: nothing fetched
    assert "vegaEmbed" in html and "vega-lite" in html
    for title in ("Accuracy per epoch", "Loss per epoch", "LR range test", "LR per batch", "Per-class test accuracy",
                  "Confusion matrix"):
        assert title in html, title
    assert html.count('"type": "log"') >= 1                 # the LR range test's log LR axis
    assert VARIANT in html and "plots/augmentation.png" in html   # the train stage's preview, per revision
    assert '"title": "epoch"' in html and '"title": "step"' not in html


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--virtual-time-budget=5000"]


def interactive_plots() -> list[str]:
    """The plots dvc.yaml declares that DVC draws with vega (every one but the PNG images)."""
    import yaml

    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    declared = dvcfile.paths(pipeline, "plots")
    for stage in pipeline["stages"].values():
        declared += dvcfile.paths(stage, "plots")
    return [name for name in declared if not name.endswith(".png")]


def test_interactive_plots_are_the_curves_the_range_test_the_schedule_time_and_the_test_split():
    assert sorted(interactive_plots()) == sorted([
        "Accuracy per epoch", "Loss per epoch", "plots/lr_find.csv", "plots/lr_schedule.csv",
        "plots/time_to_accuracy.csv", "plots/per_class.csv", "plots/confusion.csv"])


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_plots_diff_renders_offline_in_chromium(experiments, tmp_path):
    """The page as a browser with no network draws it: every interactive plot has a canvas with
    content, and the screenshot is not blank where the plots are."""
    experiments, _ = experiments
    import numpy as np
    from PIL import Image

    out = tmp_path / "plots"
    run(["dvc", "plots", "diff", "HEAD", VARIANT, "-o", str(out)], experiments)
    page = (out / "index.html").as_uri()
    browser = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=180).stdout
    plots = len(re.findall(r"vegaEmbed\(", (out / "index.html").read_text()))
    assert plots == len(interactive_plots())
    assert dom.count("<canvas") == plots, "a plot was not drawn (vega failed to load or to render)"
    assert dom.count('class="vega-embed') == plots

    shot = tmp_path / "plots.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1400,3000", page], capture_output=True,
                   timeout=180, check=True)
    keep = os.environ.get("CIFARLAB_SCREENSHOT")       # e.g. to look at it: CIFARLAB_SCREENSHOT=/tmp/p.png
    if keep:
        shutil.copy(shot, keep)
    pixels = np.asarray(Image.open(shot).convert("L"))
    top = pixels[:1200]                                 # the interactive plots come first, two per row
    drawn = (top < 200).mean()
    assert drawn > 0.02, f"only {drawn:.1%} of the plot area is drawn: blank plots?"
    for left, right in ((0, 450), (500, 950)):          # each of the two first plots has ink of its own
        assert (pixels[40:380, left:right] < 200).mean() > 0.01


def test_compare_groups_seeds_with_mean_std_n(experiments, tmp_path):
    experiments, _ = experiments
    figure = tmp_path / "compare.png"
    result = run(["python", "-m", "cifarlab", "compare", "train.max_lr", "--figure", str(figure)], experiments)
    print(result.stdout)
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["train.max_lr", "n", "mean", "acc"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if re.match(r"^\d", line)}
    # The two seeds ran with the baseline's max_lr: one group of two, with a standard deviation.
    base = str(TINY_EXP["train"]["max_lr"])
    assert rows[base][1] == str(len(SEEDS)) and re.fullmatch(r"\d+\.\d\d", rows[base][3])
    for lr in MAX_LRS:
        assert rows[lr][1] == "1" and rows[lr][3] == "-"
    by_preset = run(["python", "-m", "cifarlab", "compare"], experiments).stdout
    assert by_preset.splitlines()[0].split()[:4] == ["report.preset", "data.source", "budget.name", "n"]
    assert by_preset.splitlines()[1].split()[:4] == ["assignment10", "synthetic", "full", str(len(MAX_LRS) + len(SEEDS))]
    from PIL import Image
    assert Image.open(figure).size[0] > 800
    keep = os.environ.get("CIFARLAB_COMPARE_FIGURE")
    if keep:
        shutil.copy(figure, keep)


def test_a_failed_stage_leaves_no_cached_output_for_git(tmp_path):
    """DVC writes "/data" into .gitignore when download first runs and deletes that line again when
    a later stage of the same command fails; the committed .gitignore must still cover data/ and
    models/, so `git add -A` cannot commit the dataset."""
    work = make_repo(tmp_path, merge(TINY_RUN, {"train": {"max_lr": 1.0e4}}))   # train diverges
    result = run(["dvc", "repro"], work, check=False)
    assert result.returncode != 0 and "training diverged" in result.stdout + result.stderr
    assert (work / "data").is_dir() and (work / "metrics/lr_find.json").exists()
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], work).stdout.splitlines()
    paths = [line[3:] for line in status]
    leaked = [p for p in paths if p.startswith(("data/", "models/")) or p.startswith(CACHED_OUTS)]
    assert leaked == [], status
    # The `cache: false` metrics and plots stay visible to git.
    assert "plots/lr_find.csv" in paths
    ignored = run(["git", "check-ignore", "--no-index", "plots/lr_find.csv", "metrics/test.json"], work, check=False)
    assert ignored.stdout == ""
