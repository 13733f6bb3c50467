"""cifarlab.tools.compare on `dvc exp show` rows: grouping, mean / standard deviation / n, the figure."""

from __future__ import annotations

import statistics

import pytest

from cifarlab.errors import CifarlabError
from cifarlab.tools.compare import BY_DEFAULT, compare, figure, finished_runs, group_runs, mean_band, table
from cifarlab.tools.experiments import RunInputs, same_run_note


def row(name, preset, seed, accuracy, typ="branch_commit", state=None, **extra):
    return {"Experiment": name, "rev": (name or "workspace")[:7], "typ": typ, "State": state, "report.preset": preset,
            "train.seed": float(seed), "accuracy": accuracy, **extra}


INPUTS = RunInputs(sections=frozenset({"report", "train", "data", "budget"}),
                   inputs=frozenset({"src/cifarlab/pipeline/train.py"}))
ROWS = [
    row(None, "assignment10", 1, 0.99, typ="baseline") | {"rev": "workspace"},   # not an experiment
    row("a8-1", "assignment8", 1, 0.86), row("a8-2", "assignment8", 2, 0.88), row("a8-3", "assignment8", 3, 0.87),
    row("a10-1", "assignment10", 1, 0.90, typ="branch_base"), row("a10-2", "assignment10", 2, 0.91),
    row("a10-q", "assignment10", 3, None, state="Queued"), row("a10-f", "assignment10", 4, None, state="Failed"),
]


def test_groups_by_preset_with_mean_sample_std_and_n():
    groups = group_runs(finished_runs(ROWS, ["report.preset"]))
    assert [(g.key, g.n) for g in groups] == [(("assignment10",), 2), (("assignment8",), 3)]
    a8 = groups[1]
    assert a8.mean == pytest.approx(0.87) and a8.std == pytest.approx(statistics.stdev([0.86, 0.88, 0.87]))
    text = table(groups, ["report.preset"])
    assert text.splitlines()[2].split()[:4] == ["assignment8", "3", "87.00%", "1.00"]


def test_groups_by_any_params_and_a_single_run_has_no_std():
    groups = group_runs(finished_runs(ROWS, ["report.preset", "train.seed"]))
    assert ("assignment8", "2") in [g.key for g in groups]          # 2.0 from DVC shows as 2
    assert all(g.n == 1 and g.std == 0.0 for g in groups)
    assert table(groups, ["report.preset", "train.seed"]).splitlines()[1].split()[3:5] == ["90.00%", "-"]


def test_a_metric_qualified_by_its_file_is_found():
    rows = [{"Experiment": "x", "rev": "x", "typ": "branch_commit", "report.preset": "p",
             "metrics/test.json:accuracy": 0.5, "other.json:loss": 1.0}]
    assert finished_runs(rows, ["report.preset"])[0].accuracy == 0.5


def test_nothing_finished_is_an_error():
    with pytest.raises(CifarlabError, match="no finished experiments"):
        compare(["report.preset"], rows=ROWS[:1], inputs=INPUTS)


def test_one_run_under_two_names_counts_once_and_is_named():
    """A run the run-cache restored under a second name has the same params and code: one run, not
    two seeds agreeing perfectly."""
    restored = row("a8-1-again", "assignment8", 1, 0.86)
    groups, others = compare(["report.preset"], rows=[*ROWS, restored], inputs=INPUTS)
    assert [(g.key, g.n) for g in groups] == [(("assignment10",), 2), (("assignment8",), 3)]
    assert others == {"a8-1": ["a8-1-again"]}
    assert same_run_note(others).endswith(": a8-1 = a8-1-again")
    changed_code = restored | {"src/cifarlab/pipeline/train.py": "another hash"}
    groups, others = compare(["report.preset"], rows=[*ROWS, changed_code], inputs=INPUTS)
    assert groups[1].n == 4 and others == {}                         # other code: another run


def test_groups_by_preset_data_source_and_budget_by_default():
    rows = [row("s", "assignment7", 1, 0.5, **{"data.source": "synthetic", "budget.name": "quick"}),
            row("c", "assignment7", 1, 0.8, **{"data.source": "cifar10", "budget.name": "full"})]
    groups, _ = compare(list(BY_DEFAULT), rows=rows, inputs=INPUTS)
    assert [g.key for g in groups] == [("assignment7", "cifar10", "full"), ("assignment7", "synthetic", "quick")]


def test_mean_band_over_common_epochs():
    epochs, means, stds = mean_band([[(1, 0.5), (2, 0.7)], [(1, 0.3), (2, 0.9), (3, 0.95)]])
    assert epochs == [1, 2] and means == pytest.approx([0.4, 0.8])
    assert stds == pytest.approx([statistics.stdev([0.5, 0.3]), statistics.stdev([0.7, 0.9])])


def test_figure_has_error_bars_and_bands(tmp_path):
    groups = group_runs(finished_runs(ROWS, ["report.preset"]))
    for g in groups:
        for i, run in enumerate(g.runs):
            run.curve = [(1, 0.4 + 0.01 * i), (2, 0.7 + 0.02 * i), (3, run.accuracy)]
    fig = figure(groups, ["report.preset"])
    bars, curves = fig.axes
    assert len(bars.containers) == 2                   # one errorbar per group
    assert len(curves.lines) == 2 and len(curves.collections) == 2    # mean line + band per group
    fig.savefig(tmp_path / "compare.png")
