"""Seeds with error bars: group finished experiments and compare test accuracy per group.

    python -m cifarlab compare                          # groups by preset, data source and budget
    python -m cifarlab compare model.name train.max_lr  # groups by any params
    python -m cifarlab compare --figure plots/compare.png

Reads the experiments of the current commit (`dvc exp show`'s rows; finished ones only, the
workspace and baseline rows left out) and prints, per group, the mean, the sample standard
deviation and n of the plain test accuracy (metrics/test.json), so one lucky seed is not mistaken
for a better recipe. Each run counts once: an experiment restored from the run-cache under a second
name (same params, code and data) is the same run (`experiments.distinct`), and the table says so. The figure shows accuracy per group with error bars (one standard deviation)
and each group's per-epoch test-accuracy curve as its mean with a band of one standard deviation.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from cifarlab.errors import CifarlabError
from cifarlab.tools.experiments import RunInputs, distinct, finished, name_of, read_rows, same_run_note, value

ACCURACY = "accuracy"                                        # metrics/test.json, plain (not TTA)
TEST_CURVE = "metrics/train/plots/metrics/test/accuracy.tsv"  # dvclive: step (epoch), accuracy
BY_DEFAULT = ("report.preset", "data.source", "budget.name")


@dataclass
class Run:
    name: str
    rev: str
    group: tuple
    accuracy: float
    curve: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Group:
    key: tuple
    runs: list[Run]

    @property
    def accuracies(self) -> list[float]:
        return [run.accuracy for run in self.runs]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1); 0 for a single run, which the table marks as n = 1."""
        return statistics.stdev(self.accuracies) if self.n > 1 else 0.0


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "-" if value is None else str(value)


def finished_runs(rows: Iterable[dict], by: Sequence[str]) -> list[Run]:
    """Experiments (not the workspace or the baseline commits) that finished with a test accuracy."""
    return [Run(name=name_of(row), rev=row["rev"], group=tuple(_show(value(row, name)) for name in by),
                accuracy=float(value(row, ACCURACY))) for row in finished(rows)]


def group_runs(runs: Iterable[Run]) -> list[Group]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return [Group(key, members) for key, members in sorted(groups.items())]


def read_curve(repo: str, rev: str) -> list[tuple[int, float]]:
    """One experiment's per-epoch test accuracy, read from DVC at that revision (cached dvclive file)."""
    from dvc.api import DVCFileSystem

    try:
        text = DVCFileSystem(repo, rev=rev).read_text(TEST_CURVE)
    except Exception:   # noqa: BLE001  (an experiment from before the curves existed: no band for it)
        return []
    return [(int(float(row["step"])), float(row["accuracy"])) for row in csv.DictReader(io.StringIO(text), delimiter="\t")]


def mean_band(curves: Sequence[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """Epochs every curve has, with the mean and the sample standard deviation there."""
    if not curves:
        return [], [], []
    common = sorted(set.intersection(*(set(dict(curve)) for curve in curves)))
    by_epoch = [dict(curve) for curve in curves]
    means = [statistics.fmean(c[e] for c in by_epoch) for e in common]
    stds = [statistics.stdev([c[e] for c in by_epoch]) if len(by_epoch) > 1 else 0.0 for e in common]
    return common, means, stds


def table(groups: Sequence[Group], by: Sequence[str]) -> str:
    header = [*by, "n", "mean acc", "std", "runs"]
    rows = [[*g.key, str(g.n), f"{100 * g.mean:.2f}%", f"{100 * g.std:.2f}" if g.n > 1 else "-",
             ", ".join(r.name for r in g.runs)] for g in groups]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in (header, *rows)]
    note = "std: sample standard deviation of test accuracy, in points; - where n = 1"
    return "\n".join([*lines, note])


def figure(groups: Sequence[Group], by: Sequence[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = [" / ".join(g.key) for g in groups]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, g in enumerate(groups):
        color = colors[i % len(colors)]
        bars.errorbar([i], [100 * g.mean], yerr=[100 * g.std], fmt="o", color=color, capsize=8, markersize=8)
        bars.scatter([i] * g.n, [100 * a for a in g.accuracies], color=color, alpha=0.35, s=18, zorder=3)
        bars.annotate(f"{100 * g.mean:.1f}%\nn={g.n}", (i, 100 * g.mean), textcoords="offset points",
                      xytext=(14, -10), fontsize=9)
        epochs, means, stds = mean_band([r.curve for r in g.runs if r.curve])
        if epochs:
            low = [100 * (m - s) for m, s in zip(means, stds)]
            high = [100 * (m + s) for m, s in zip(means, stds)]
            curves.plot(epochs, [100 * m for m in means], color=color, marker="o", markersize=3,
                        label=f"{labels[i]} (n={g.n})")
            curves.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
    bars.set_xticks(range(len(groups)), labels, rotation=20 if max(map(len, labels), default=0) > 12 else 0)
    bars.set_xlim(-0.6, len(groups) - 0.15)   # room for the last group's label
    bars.set_xlabel(" / ".join(by))
    bars.set_ylabel("test accuracy (%)")
    bars.set_title("Final test accuracy: mean ± 1 std (dots: runs)")
    bars.grid(axis="y", alpha=0.3)
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.set_xlabel("epoch")
    curves.set_ylabel("test accuracy (%)")
    curves.set_title("Test accuracy per epoch: mean, band ± 1 std")
    curves.grid(alpha=0.3)
    if curves.lines:
        curves.legend(fontsize=9)
    fig.tight_layout()
    return fig


def compare(by: Sequence[str], repo: str = ".", figure_path: str | None = None, rows: list[dict] | None = None,
            inputs: RunInputs | None = None) -> tuple[list[Group], dict[str, list[str]]]:
    """The groups of distinct finished runs, and the other names of runs counted once."""
    rows = read_rows(repo) if rows is None else rows
    kept, others = distinct(finished(rows), inputs or RunInputs.of_repo(repo))
    runs = finished_runs(kept, by)
    if not runs:
        raise CifarlabError("no finished experiments with metrics/test.json on this commit; run some with "
                            "`dvc exp run --queue ...` and `dvc queue start` first")
    groups = group_runs(runs)
    if figure_path:
        from cifarlab.atomic import save_figure

        for run in runs:
            run.curve = read_curve(repo, run.rev)
        save_figure(figure(groups, by), figure_path, dpi=120)
    return groups, others


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifarlab compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("params", nargs="*", default=list(BY_DEFAULT),
                        help=f"params to group by, as `dvc exp show` names them (default: {' '.join(BY_DEFAULT)})")
    parser.add_argument("--figure", metavar="PATH", help="write the figure (PNG, or any matplotlib format) here")
    parser.add_argument("--repo", default=".", help="the DVC repository (default: the current directory)")
    args = parser.parse_args(argv)
    try:
        groups, others = compare(args.params, args.repo, args.figure)
    except CifarlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(table(groups, args.params))
    if others:
        print(same_run_note(others))
    if args.figure:
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
