"""The figures and DVC's plots: a class at 0% still shows, the range test's lowest point says what
it is, and `dvc plots` draws the LR per batch on a log axis, accuracy in percent (the report's unit)
and an empty range test (one not run) as a plot that says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run

PLOT_TEMPLATES = REPO / ".dvc" / "plots"


def dvc_plots() -> dict[str, dict]:
    """Every plot dvc.yaml declares (stage-level and top-level), by name, with its props."""
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    found = {}
    for entries in [stage.get("plots", []) for stage in pipeline["stages"].values()] + [pipeline["plots"]]:
        for entry in entries:
            if isinstance(entry, dict):
                found.update(entry)
    return found


# --- the matplotlib figures -------------------------------------------------------------------------

def test_a_class_at_zero_percent_has_a_red_bar_and_its_label():
    from cifarlab.pipeline.plots import ZERO_STUB, per_class_figure

    fig = per_class_figure({"cat": 0.0, "dog": 0.5, "ship": 1.0}, 0.5, "per class")
    ax = fig.axes[0]
    bars = ax.patches[:3]
    assert bars[0].get_width() == ZERO_STUB > 0                     # drawn, not a zero-width bar
    assert bars[0].get_facecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=0.01)   # tab:red
    assert [bar.get_width() for bar in bars[1:]] == [50.0, 100.0]   # the others as measured
    assert "0.0%" in [text.get_text() for text in ax.texts]
    # all at 0%: nothing is below the overall accuracy, and each bar is still red and visible
    everything_zero = per_class_figure({"cat": 0.0, "dog": 0.0}, 0.0, "per class").axes[0].patches[:2]
    assert all(bar.get_width() == ZERO_STUB and bar.get_facecolor()[0] > 0.8 for bar in everything_zero)


def test_the_range_test_figure_names_a_minimum_at_the_sweeps_end():
    from cifarlab.pipeline.plots import lr_find_figure, lr_find_not_run_figure

    def legend(**kwargs) -> list[str]:
        fig = lr_find_figure([1e-5, 1e-4, 1e-3, 1e-2], [2.3, 2.0, 1.5, 1.2], {"min_div_10": 1e-3}, "min_div_10",
                             1e-2, [1e-5, 1e-2], 1.5, False, **kwargs)
        return [text.get_text() for text in fig.axes[0].get_legend().get_texts()]

    assert "lowest point: 1.00e-02, the sweep's end (still falling)" in legend(minimum_at_end=True)
    assert any("above the lowest point" in label for label in legend(minimum_at_end=True))
    turned = legend()
    assert "loss minimum: 1.00e-02 (never used)" in turned and any("above the loss minimum" in x for x in turned)
    texts = [text.get_text() for text in lr_find_not_run_figure(1.5).axes[0].texts]
    assert any("train.max_lr is a number" in text and "lr_find.when: always" in text for text in texts)


# --- the templates dvc.yaml names -------------------------------------------------------------------

def render(template: str, datapoints: list[dict], **props) -> dict:
    """The vega-lite spec DVC fills for `template` (.dvc/plots/) with `datapoints`, as `dvc plots` does."""
    from dvc_render import VegaRenderer

    return VegaRenderer(datapoints, "plot", template=template, template_dir=str(PLOT_TEMPLATES),
                        **props).get_filled_template()


@pytest.mark.parametrize("name,template", [
    ("plots/lr_find.csv", "lr_range_log"), ("plots/lr_schedule.csv", "linear_log_y"),
    ("plots/time_to_accuracy.csv", "linear_percent"), ("Accuracy per epoch", "linear_percent"),
    ("plots/per_class.csv", "bar_horizontal_percent")])
def test_dvc_yaml_draws_each_plot_with_its_template(name, template):
    assert dvc_plots()[name]["template"] == template
    assert (PLOT_TEMPLATES / f"{template}.json").is_file()


def test_the_lr_per_batch_is_on_a_log_axis():
    spec = render("linear_log_y", [{"step": "1", "lr": "1e-5", "rev": "a"}, {"step": "2", "lr": "1.5", "rev": "b"}],
                  x="step", y="lr")
    assert spec["encoding"]["y"]["scale"] == {"type": "log"} and spec["encoding"]["y"]["field"] == "lr"


@pytest.mark.parametrize("template,axis,field", [("linear_percent", "y", "accuracy"),
                                                 ("bar_horizontal_percent", "x", "accuracy")])
def test_accuracy_is_drawn_in_percent(template, axis, field):
    other = "class" if axis == "x" else "step"
    points = [{field: "0.8", other: "1", "rev": "a"}, {field: "0.0", other: "2", "rev": "a"}]
    spec = render(template, points, **{axis: field, "y" if axis == "x" else "x": other})
    assert spec["transform"][0] == {"calculate": f"100 * toNumber(datum['{field}'])", "as": field}
    assert "%" in dvc_plots()["plots/per_class.csv"]["x_label"] and "%" in dvc_plots()["Accuracy per epoch"]["y_label"]


def test_a_range_test_not_run_is_a_plot_that_says_so():
    from cifarlab.pipeline.lr_find import NOT_RUN_CURVE, NOT_RUN_NOTE

    header, row = NOT_RUN_CURVE.splitlines()
    point = dict(zip(header.split(","), row.split(",", 2))) | {"rev": "workspace"}
    assert point == {"lr": "", "loss": "", "note": NOT_RUN_NOTE, "rev": "workspace"}
    spec = render("lr_range_log", [point], x="lr", y="loss")
    assert spec and spec["data"]["values"] == [point]       # a header alone gives DVC no data: an empty spec
    note = spec["layer"][1]
    assert note["mark"]["type"] == "text" and "datum.note" in note["transform"][0]["filter"]


def test_dvc_plots_show_draws_every_plot_of_a_tiny_run(tiny_run, tmp_path):
    """`dvc plots show` on the tiny run (a numeric train.max_lr: no range test): every interactive plot
    has a spec, the range test's is the note, and the accuracy and LR plots use the templates above."""
    work = tmp_path / "repo"
    shutil.copytree(tiny_run, work, symlinks=True)
    shown = json.loads(run(["dvc", "plots", "show", "--json"], work).stdout)["data"]
    vega = {name: plots[0]["content"] for name, plots in shown.items() if plots[0]["type"] == "vega"}
    assert set(vega) == {name for name in dvc_plots() if not name.endswith(".png")}
    assert all(vega.values())                                   # no empty spec: each one draws
    assert vega["plots/lr_find.csv"]["data"]["values"][0]["note"].startswith("range test not run")
    assert vega["plots/lr_schedule.csv"]["encoding"]["y"]["scale"]["type"] == "log"
    for name in ("Accuracy per epoch", "plots/time_to_accuracy.csv", "plots/per_class.csv"):
        assert vega[name]["transform"][0]["calculate"].startswith("100 * toNumber"), name
    assert Path(work / "plots/lr_find.csv").read_text().startswith("lr,loss,note\n")
