"""The experiments of the current commit as a table a person reads at 100 columns.

    python -m cifarlab exps              # best first; what identifies a run, then its few figures
    python -m cifarlab exps --width 120  # (default: the terminal's width)

Each row says first what the run is (experiment, preset, budget, seed, data source), then the figures
compared (test accuracy, TTA accuracy, the max LR training used, epochs, training minutes), sorted by
test accuracy; the best experiment is named below the table.

A run restored from DVC's run-cache under a second name (same params, same code, same data) is the same
run: it is listed once, and the line under the table names its other names. `compare` counts runs the
same way (`distinct`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from cifarlab import dvcfile
from cifarlab.errors import CifarlabError

META = ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor")
UNFINISHED = {"Queued", "Running", "Failed"}
EXPERIMENT_TYPES = ("branch_base", "branch_commit")
TTA_METRICS = ("tta_translate.accuracy", "tta_hflip.accuracy")   # the fullest TTA first


def value(row: dict, name: str) -> Any:
    """A param or metric of an `exp show` row: by its plain name, or `file:name` when DVC had to
    qualify it because two files use the name."""
    if name in row:
        return row[name]
    matches = [key for key in row if key.endswith(f":{name}")]
    return row[matches[0]] if len(matches) == 1 else None


def finished(rows: Iterable[dict]) -> list[dict]:
    """Experiment rows (not the workspace or baseline commits) that finished with a test accuracy."""
    return [row for row in rows if row.get("typ") in EXPERIMENT_TYPES and row.get("State") not in UNFINISHED
            and isinstance(value(row, "accuracy"), (int, float))]


@dataclass(frozen=True)
class RunInputs:
    """What decides a run: the params sections (params.yaml's top-level keys) and the stages' inputs
    that no stage writes (code, stage scripts). Data is decided by the `data.*` params."""

    sections: frozenset[str]
    inputs: frozenset[str]

    @classmethod
    def of_repo(cls, repo: str | Path = ".") -> "RunInputs":
        root = Path(repo)
        try:
            params = yaml.safe_load((root / "params.yaml").read_text()) or {}
            stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
        except (OSError, yaml.YAMLError) as err:
            raise CifarlabError(f"cannot read params.yaml and dvc.yaml in {root}: {err}") from None
        deps = {path for stage in stages.values() for path in dvcfile.paths(stage, "deps")}
        outs = {path for stage in stages.values() for path in dvcfile.paths(stage, *dvcfile.OUT_KINDS)}
        return cls(frozenset(params), frozenset(deps - outs))

    def identity(self, row: dict) -> tuple:
        def decides(key: str) -> bool:
            name = key.split(":", 1)[-1]
            return key in self.inputs or name.split(".", 1)[0] in self.sections
        return tuple(sorted((key, repr(row[key])) for key in row if key not in META and decides(key)))


def name_of(row: dict) -> str:
    return row.get("Experiment") or row["rev"]


def distinct(rows: Iterable[dict], inputs: RunInputs) -> tuple[list[dict], dict[str, list[str]]]:
    """Each run once (the first row of each identity, in DVC's order, the newest first) and, per kept
    name, the other names of the same run."""
    kept: dict[tuple, dict] = {}
    others: dict[str, list[str]] = {}
    for row in rows:
        key = inputs.identity(row)
        if key in kept:
            others.setdefault(name_of(kept[key]), []).append(name_of(row))
        else:
            kept[key] = row
    return list(kept.values()), others


def same_run_note(others: dict[str, list[str]]) -> str:
    """One line naming the runs counted once, or "" when every name is its own run."""
    if not others:
        return ""
    pairs = "; ".join(f"{kept} = {', '.join(names)}" for kept, names in others.items())
    return f"counted once, one run under several names (same params, code and data): {pairs}"


def read_rows(repo: str | Path = ".") -> list[dict]:
    import dvc.api

    return dvc.api.exp_show(repo=str(repo))


def _percent(x: Any) -> str:
    return f"{100 * x:.2f}" if isinstance(x, (int, float)) else "-"


def _plain(x: Any, spec: str = "") -> str:
    if isinstance(x, float) and x.is_integer() and not spec:
        return str(int(x))
    if isinstance(x, (int, float)) and spec:
        return format(x, spec)
    return "-" if x is None else str(x)


def tta(row: dict) -> Any:
    return next((value(row, name) for name in TTA_METRICS if value(row, name) is not None), None)


COLUMNS = (   # header, how a row's cell reads, aligned right
    ("experiment", name_of, False),
    ("preset", lambda r: _plain(value(r, "report.preset")), False),
    ("budget", lambda r: _plain(value(r, "budget.name")), False),
    ("seed", lambda r: _plain(value(r, "train.seed")), True),
    ("data", lambda r: _plain(value(r, "data.source")), False),
    ("acc %", lambda r: _percent(value(r, "accuracy")), True),
    ("TTA %", lambda r: _percent(tta(r)), True),
    ("max LR", lambda r: _plain(value(r, "max_lr"), ".3g"), True),
    ("epochs", lambda r: _plain(value(r, "epochs")), True),
    ("minutes", lambda r: _plain(value(r, "train_minutes"), ".1f"), True),
)
MIN_NAME = 8


def render(rows: Sequence[dict], width: int) -> list[str]:
    """The table's lines, best accuracy first, the experiment column cut (with `…`) to fit `width`."""
    ordered = sorted(rows, key=lambda r: -float(value(r, "accuracy")))
    cells = [[read(row) for _, read, _ in COLUMNS] for row in ordered]
    headers = [header for header, _, _ in COLUMNS]
    widths = [max(len(c) for c in column) for column in zip(headers, *cells)]
    room = width - (sum(widths[1:]) + 2 * (len(widths) - 1))
    widths[0] = max(MIN_NAME, min(widths[0], room))
    def line(values: Sequence[str]) -> str:
        out = []
        for (_, _, right), text, w in zip(COLUMNS, values, widths):
            text = text if len(text) <= w else text[:w - 1] + "…"
            out.append(text.rjust(w) if right else text.ljust(w))
        return "  ".join(out).rstrip()
    return [line(headers), *(line(c) for c in cells)]


def baseline_note(rows: Iterable[dict]) -> str:
    base = next((row for row in rows if row.get("typ") == "baseline" and row.get("rev") != "workspace"), None)
    if base is None:
        return ""
    if isinstance(value(base, "accuracy"), (int, float)):
        return (f"baseline {base['rev']}: {_percent(value(base, 'accuracy'))}% (the first row of `dvc exp show`, "
                f"the commit the experiments branch from)")
    return (f"baseline {base['rev']}: the commit holds no results (`dvc exp show` prints `!` in its row: it was committed "
            f"without its outputs; the experiments branch from it)")


def experiments_table(repo: str | Path = ".", width: int = 100, rows: list[dict] | None = None) -> str:
    rows = read_rows(repo) if rows is None else rows
    runs, others = distinct(finished(rows), RunInputs.of_repo(repo))
    if not runs:
        raise CifarlabError("no finished experiments with metrics/test.json on this commit; run one with "
                            "`dvc exp run -n NAME -S preset=...` first")
    best = max(runs, key=lambda r: float(value(r, "accuracy")))
    lines = render(runs, width)
    extra = [f"best: {name_of(best)}, {_percent(value(best, 'accuracy'))}% test accuracy "
             f"({value(best, 'report.preset')}, budget {value(best, 'budget.name')})",
             same_run_note(others), baseline_note(rows)]
    return "\n".join([*lines, *(textwrap.fill(line, width, subsequent_indent="  ") for line in extra if line)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifarlab exps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=None, help="columns to fit (default: the terminal's width)")
    parser.add_argument("--repo", default=".", help="the DVC repository (default: the current directory)")
    args = parser.parse_args(argv)
    width = args.width or shutil.get_terminal_size((100, 24)).columns
    try:
        print(experiments_table(args.repo, width))
    except CifarlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
