"""Presets end to end: two presets as named experiments, compared and tagged, and the quick budget
with a preset, each through `dvc exp run` in a temporary repo."""

from __future__ import annotations

import json

import yaml

import pytest

from conftest import PRESET_A_MAX_LR, REPO, TINY_RUN, exp_rows, make_repo, ran_stages, run
from conftest import composed as compose
from test_presets import QUICK, SEEDS

@pytest.mark.e2e
def test_presets_run_as_named_experiments_and_compare(preset_runs, tmp_path):
    """assignment7 ("a") and assignment10 ("b") as named experiments (conftest.preset_runs): each
    takes its preset's recipe; TINY_RUN (composed after it) keeps the run tiny; `-S` on the command
    line wins over both."""
    work, _ = preset_runs
    rows = exp_rows(json.loads(run(["dvc", "exp", "show", "--json"], work).stdout))
    assert {"a", "b"} <= set(rows)
    for name, preset, max_lr in (("a", "assignment7", PRESET_A_MAX_LR), ("b", "assignment10", TINY_RUN["train"]["max_lr"])):
        params = rows[name]["params"]["params.yaml"]["data"]
        recipe = compose([f"preset={preset}"])
        for section in ("model", "augment", "optim", "report"):      # the preset's, untouched by TINY_RUN
            assert params[section] == recipe[section], (name, section)
        assert params["model"]["name"] == SEEDS[preset]["model"]
        assert (params["train"]["epochs"], params["train"]["max_lr"]) == (1, max_lr)
        assert 0.0 <= rows[name]["metrics"]["metrics/test.json"]["data"]["accuracy"] <= 1.0
        assert rows[name]["metrics"]["metrics/training.json"]["data"]["max_lr"] == max_lr

    out = tmp_path / "exp_plots"
    run(["dvc", "plots", "diff", "a", "b", "-o", str(out)], work)
    html = (out / "index.html").read_text()
    assert '"a"' in html and '"b"' in html and "Accuracy per epoch" in html

    # Keep each run as a commit and tag it by assignment; plots then compare across revisions.
    for name, tag in (("a", "assignment-7"), ("b", "assignment-10")):
        run(["dvc", "exp", "branch", name, f"run-{name}"], work)
        run(["git", "tag", tag, f"run-{name}"], work)
    out = tmp_path / "tag_plots"
    run(["dvc", "plots", "diff", "assignment-7", "assignment-10", "-o", str(out)], work)
    html = (out / "index.html").read_text()
    assert '"assignment-7"' in html and '"assignment-10"' in html and "Accuracy per epoch" in html


@pytest.mark.e2e
def test_quick_budget_runs_a_preset_end_to_end(tmp_path, monkeypatch):
    """`dvc exp run -S preset=assignment7 -S budget=quick` on the synthetic set: the preset's recipe
    with the quick budget's cuts, on class-balanced subsets taken when the stages load data/ (which
    keeps the whole split, so changing a subset never reruns download)."""
    import math
    import time


    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    work = make_repo(tmp_path, {"data": {"source": "synthetic"}})     # only the source: the budget's keys stay
    started = time.perf_counter()
    result = run(["dvc", "exp", "run", "-n", "a7-quick", "-S", "preset=assignment7", "-S", "budget=quick"], work)
    print(f"assignment7, budget quick: {time.perf_counter() - started:.0f} s")
    assert ran_stages(result.stdout) == set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])

    params = exp_rows(json.loads(run(["dvc", "exp", "show", "--json"], work).stdout))["a7-quick"]["params"]
    params = params["params.yaml"]["data"]
    assert (params["report"]["preset"], params["budget"]["name"]) == ("assignment7", "quick")
    assert params["model"]["name"] == SEEDS["assignment7"]["model"]
    for key, value in QUICK.items():
        section, name = key.split(".")
        assert params[section][name] == value, key

    train_size, test_size = QUICK["data.train_subset"], QUICK["data.test_subset"]
    meta = json.loads((work / "data" / "meta.json").read_text())
    assert (meta["train_size"], meta["test_size"]) == (5000, 1000)          # data/ holds the whole synthetic split
    assert f"on {train_size} synthetic images" in result.stdout               # train saw the subset
    evaluation = json.loads((work / "metrics" / "evaluate.json").read_text())
    assert evaluation["test_images"] == test_size                             # evaluate measured the test subset
    assert sum(1 for _ in (work / "plots" / "confusion.csv").open()) == test_size + 1
    lr_find = json.loads((work / "metrics" / "lr_find.json").read_text())
    assert lr_find["iterations"] <= QUICK["lr_find.num_iter"] and lr_find["max_lr"] < lr_find["loss_minimum_lr"]
    steps = (work / "plots" / "lr_schedule.csv").read_text().splitlines()[1:]
    assert len(steps) == QUICK["train.epochs"] * math.ceil(train_size / QUICK["train.batch_size"])

    smaller = run(["dvc", "exp", "run", "-n", "a7-quick-50", "-S", "preset=assignment7", "-S", "budget=quick",
                   "-S", "data.test_subset=50"], work)
    assert ran_stages(smaller.stdout) == {"train", "evaluate", "report"}    # no new download, no new range test
    assert json.loads((work / "metrics" / "evaluate.json").read_text())["test_images"] == 50


