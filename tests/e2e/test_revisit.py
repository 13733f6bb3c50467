"""End to end: revisiting a configuration restores it from DVC's run-cache, and a new LR range test
retrains only when training takes its suggestion.

Run A, then B, then A again with `dvc exp run`: the third run runs no stage (every one is checked
out of the run-cache, train included), gives A's metrics and model byte for byte, and takes a small
fraction of the first run's wall time. Then, with `train.max_lr` a number (B) and `lr_find.when:
always`, changing `lr_find.num_iter` reruns the range test but not train; with `train.max_lr: find`
(A) the same change retrains.
"""

from __future__ import annotations

import json

import pytest

from conftest import PRESET_A, PRESET_B, TINY_RUN, exp_rows, exp_run, ran_stages, run, snapshot

pytestmark = pytest.mark.e2e

STAGES = ("download", "lr_find", "max_lr", "train", "evaluate", "report")
NUM_ITER = TINY_RUN["lr_find"]["num_iter"]
OTHER_NUM_ITER = NUM_ITER + 10


def cached_stages(output: str) -> set[str]:
    """Stages DVC restored from its run-cache instead of running them."""
    return {line.split("'")[1] for line in output.splitlines()
            if line.startswith("Stage '") and "is cached - skipping run" in line}


def unchanged_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines()
            if line.startswith("Stage '") and "didn't change, skipping" in line}


def test_first_two_runs_run_every_stage_that_changed(preset_runs):
    _, runs = preset_runs
    assert ran_stages(runs["a"]["output"]) == set(STAGES)
    assert ran_stages(runs["b"]["output"]) == set(STAGES)       # B changed every stage's inputs
    assert runs["a"]["files"]["models/model.pt"] != runs["b"]["files"]["models/model.pt"]


def test_revisit_restores_every_stage_from_the_run_cache(preset_runs):
    _, runs = preset_runs
    output = runs["a-again"]["output"]
    assert ran_stages(output) == set(), output
    assert cached_stages(output) == set(STAGES), output          # train included: nothing trains
    assert "python stages/" not in output                        # no stage command was started


def test_revisit_gives_the_first_runs_metrics_and_model(preset_runs):
    work, runs = preset_runs
    assert runs["a-again"]["files"] == runs["a"]["files"]        # byte for byte, model.pt and report included
    rows = exp_rows(json.loads(run(["dvc", "exp", "show", "--json"], work).stdout))
    assert rows["a-again"]["metrics"] == rows["a"]["metrics"] != rows["b"]["metrics"]


def test_revisit_takes_a_small_fraction_of_the_first_run(preset_runs):
    _, runs = preset_runs
    first, second, third = (runs[name]["seconds"] for name in ("a", "b", "a-again"))
    print(f"wall time: A {first:.1f} s, B {second:.1f} s, A again {third:.1f} s ({third / first:.1%} of A)")
    assert third < first / 2, (first, second, third)     # DVC's own start-up and checkout remain


def test_plots_diff_shows_the_reports_figures_of_both_runs(preset_runs, tmp_path):
    """reports/ is a DVC-cached out: `dvc plots diff` takes each experiment's report figures from the cache."""
    work, _ = preset_runs
    out = tmp_path / "plots"
    run(["dvc", "plots", "diff", "a", "b", "-o", str(out)], work)
    html = (out / "index.html").read_text()
    for figure in ("lr_find.png", "lr_schedule.png", "curves.png"):
        for rev in ("a", "b"):
            images = list((out / "static").glob(f"{rev}_reports_figures_{figure}"))
            assert images and images[0].stat().st_size > 1000, (rev, figure, sorted(p.name for p in (out / "static").iterdir()))
            assert images[0].name in html
    shown = {(out / "static" / f"{rev}_reports_figures_curves.png").read_bytes() for rev in ("a", "b")}
    assert len(shown) == 2                                       # each run's own figure, not one twice


@pytest.fixture(scope="module")
def range_test_changed(preset_runs):
    """After A again: B's numeric max LR with a new range test, then A (`find`) with the same change."""
    work, _ = preset_runs
    changed = ["-S", f"lr_find.num_iter={OTHER_NUM_ITER}"]
    runs = {}
    for name, overrides in (("numeric-new-range-test", [*PRESET_B, *changed, "-S", "lr_find.when=always"]),  # a real one
                            ("find-new-range-test", [*PRESET_A, *changed])):
        output, seconds = exp_run(work, name, overrides)
        runs[name] = {"output": output, "seconds": seconds, "files": snapshot(work)}
    print("\n".join(f"dvc exp run {name}: {r['seconds']:.1f} s" for name, r in runs.items()))
    return runs


def test_numeric_max_lr_is_not_retrained_by_a_new_range_test(preset_runs, range_test_changed):
    """B's stages after the range test come back from the run-cache (the workspace held A): a new
    range test is no input of training with a numeric max LR."""
    _, before = preset_runs
    after = range_test_changed["numeric-new-range-test"]
    assert after["files"]["metrics/lr_find.json"] != before["b"]["files"]["metrics/lr_find.json"]
    assert {"lr_find", "max_lr"} <= ran_stages(after["output"])   # a new range test, resolved again
    assert {"train", "evaluate"} <= cached_stages(after["output"]), after["output"]   # B's, from the run-cache
    assert "report" in ran_stages(after["output"])                # it draws the new range test
    assert after["files"]["metrics/max_lr.json"] == before["b"]["files"]["metrics/max_lr.json"]
    assert after["files"]["models/model.pt"] == before["b"]["files"]["models/model.pt"]


def test_find_is_retrained_by_a_new_range_test(preset_runs, range_test_changed):
    _, before = preset_runs
    first, second = before["a"], range_test_changed["find-new-range-test"]
    old = json.loads(first["files"]["metrics/lr_find.json"])
    new = json.loads(second["files"]["metrics/lr_find.json"])
    assert new["max_lr"] != old["max_lr"], "the two range tests suggested the same LR: the test proves nothing"
    assert {"lr_find", "max_lr", "train"} <= ran_stages(second["output"]), second["output"]
    for files, suggested in ((first["files"], old), (second["files"], new)):
        assert json.loads(files["metrics/training.json"])["max_lr"] == suggested["max_lr"]
        assert json.loads(files["metrics/max_lr.json"]) == {
            "max_lr": suggested["max_lr"], "chosen_by": "lr_find", "train.max_lr": "find",
            "rule": suggested["rule"], "loss_minimum_lr": suggested["loss_minimum_lr"]}
