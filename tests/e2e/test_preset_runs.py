"""Presets end to end: two presets as named experiments, compared and tagged, through `dvc exp run`
in a temporary repo (the quick budget with a preset: tests/e2e/test_notebook.py, on the notebook's runs)."""

from __future__ import annotations

import json


import pytest

from conftest import PRESET_B_MAX_LR, exp_rows, run
from conftest import composed as compose
from test_presets import SEEDS

@pytest.mark.e2e
def test_presets_run_as_named_experiments_and_compare(preset_runs, tmp_path):
    """assignment7 ("a") and assignment10 ("b") as named experiments (conftest.preset_runs): each
    takes its preset's recipe; TINY_RUN (composed after it) keeps the run tiny; `-S` on the command
    line wins over both: A trains at its range test's suggestion, B at the number given."""
    work, runs = preset_runs
    rows = exp_rows(json.loads(run(["dvc", "exp", "show", "--json"], work).stdout))
    assert {"a", "b"} <= set(rows)
    suggested = json.loads(runs["a"]["files"]["metrics/lr_find.json"])["max_lr"]
    for name, preset, max_lr, trained in (("a", "assignment7", "find", suggested),
                                          ("b", "assignment10", PRESET_B_MAX_LR, PRESET_B_MAX_LR)):
        params = rows[name]["params"]["params.yaml"]["data"]
        recipe = compose([f"preset={preset}"])
        for section in ("model", "augment", "optim", "report"):      # the preset's, untouched by TINY_RUN
            assert params[section] == recipe[section], (name, section)
        assert params["model"]["name"] == SEEDS[preset]["model"]
        assert (params["train"]["epochs"], params["train"]["max_lr"]) == (1, max_lr)
        assert 0.0 <= rows[name]["metrics"]["metrics/test.json"]["data"]["accuracy"] <= 1.0
        assert rows[name]["metrics"]["metrics/training.json"]["data"]["max_lr"] == trained

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
