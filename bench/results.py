"""bench/RESULTS.md from the measurements in bench/results/: the one place measured speeds live.

Each file in bench/results/ is what one benchmark run wrote with `--json`:

    python bench/throughput.py --json bench/results/<date>-<machine>.json
    python bench/quick_budget.py --json bench/results/<date>-<machine>-quick.json
    python bench/queue_slots.py --json bench/results/<date>-<machine>-queue.json
    python bench/full_run.py --json bench/results/<date>-<machine>-run-<preset>.json   # after a full run
    python bench/results.py            # rewrite bench/RESULTS.md from every file there
    python bench/results.py --check    # exit 1 if bench/RESULTS.md is stale (the tests run this)

Numbers that change with every machine are added as a new result file, never edited by hand in a
README: a commit that records a measurement adds one JSON file and the regenerated page.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if sys.path[:1] != [str(BENCH.parent / "src")]:
    sys.path.insert(0, str(BENCH.parent / "src"))   # this checkout's library

from cifarlab.atomic import sync_generated  # noqa: E402  (after the path above)
from cifarlab.config.params import TTA_LABELS  # noqa: E402

RESULTS_DIR = BENCH / "results"
PAGE = BENCH / "RESULTS.md"

# (column header, key in throughput.py's output, format)
THROUGHPUT_COLUMNS = (
    ("device", "device", "{}"), ("precision", "precision", "{}"), ("threads", "threads", "{}"),
    ("model, batch", None, None), ("pipeline img/s", "pipeline_train_images_per_s", "{:.1f}"),
    ("seed loop img/s", "reference_train_images_per_s", "{:.1f}"),
    ("ratio", "ratio_pipeline_over_reference", "{:.2f}"), ("loader img/s", "loader_images_per_s", "{:.0f}"),
    ("step alone img/s", "step_alone_train_images_per_s", "{:.1f}"),
    ("epoch loop img/s", "loop_images_per_s", "{:.1f}"), ("per-epoch overhead s", "loop_overhead_seconds", "{:.3f}"),
    ("load avg (start, end)", None, None),
)


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt.format(value)
    return str(value)


def _machine(result: dict) -> str:
    cpu = result.get("cpu", "?")
    gpu = result.get("cuda_device")
    return f"{gpu} (host {cpu})" if gpu else f"{cpu}, {result.get('cpu_count', '?')} cores"


def throughput_rows(results: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        row = [f"[{name}](results/{name}.json)", r.get("date", "?"), _machine(r)]
        for header, key, fmt in THROUGHPUT_COLUMNS:
            if key is not None:
                row.append(_cell(r.get(key), fmt))
            elif header == "model, batch":
                row.append(f"`{r.get('model', '?')}`, {r.get('batch_size', '?')}")
            else:
                row.append(f"{_cell(r.get('loadavg_1min_start'), '{:.1f}')}, {_cell(r.get('loadavg_1min_end'), '{:.1f}')}")
        rows.append(row)
    return rows


def quick_budget_rows(results: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        for run in r["runs"]:
            rows.append([f"[{name}](results/{name}.json)", r.get("date", "?"), _machine(r), str(r.get("threads", "?")),
                         f"`{run['preset']}`", f"{run['wall_seconds']:.1f}", f"{run['cpu_seconds']:.1f}",
                         f"{run['load_before']:.1f} -> {run['load_after']:.1f}",
                         "failed" if not run.get("ok", True) else _cell(run.get("test_accuracy"), "{:.3f}")])
    return rows


def queue_slots_rows(results: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        for mode in r["modes"]:
            trains = [line.removeprefix("train: ") for lines in mode.get("slots", {}).values() for line in lines
                      if line.startswith("train: ")]
            rows.append([f"[{name}](results/{name}.json)", r.get("date", "?"), _machine(r),
                         ("smoke, " if r.get("smoke") else "") + str(r.get("experiments", "?")), f"-j {mode['jobs']}",
                         f"{mode['wall_seconds']:.1f}" if mode.get("ok") else "failed",
                         f"{mode['load_before']:.1f} -> {mode['load_after']:.1f}", "; ".join(trains) or "-",
                         _cell(r.get("speedup"), "{:.2f}x") if mode["jobs"] != 1 else ""])
    return rows


def full_run_rows(results: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        tta = ", ".join(f"{TTA_LABELS.get(key, key)} {100 * value:.2f}" for key, value in r["tta"].items()) or "-"
        rows.append([f"[{name}](results/{name}.json)", r.get("date", "?"), _machine(r), str(r.get("threads", "?")),
                     f"`{r['preset']}`", str(r["seed"]), str(r["epochs"]), f"{100 * r['accuracy']:.2f}", tta,
                     f"{r['train_seconds']:.0f}", f"{r['images_per_second']:.0f}", f"`{r.get('commit') or '?'}`"])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) if rows else "(no results yet)"


def load(results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, dict]]:
    """bench name -> {result file stem -> its JSON}, in file-name order (dates first sort by time)."""
    grouped: dict[str, dict[str, dict]] = {"throughput": {}, "quick_budget": {}, "queue_slots": {},
                                         "full_run": {}}
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
            grouped[result["bench"]][path.stem] = result
        except (ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"{path}: not a result of bench/throughput.py or bench/quick_budget.py or "
                             f"bench/queue_slots.py or bench/full_run.py (--json), which record `bench`: {err}") from None
    return grouped


def render(results_dir: Path = RESULTS_DIR) -> str:
    grouped = load(results_dir)
    return "\n\n".join([
        "# Measured speeds",
        "Generated by `python bench/results.py` from the files in [`results/`](results/), one per benchmark "
        "run (`--json`); do not edit. Compare figures only between rows of the same machine and date: "
        "machines differ between sessions, and the load average says how busy the machine was.",
        "## Training throughput (`bench/throughput.py`)",
        "Images per second of the train stage's pipeline beside the seeds' plain loop, the loader alone, the "
        "training step alone and the train stage's epoch loop; the per-epoch overhead is everything in an "
        "epoch but its training steps and its test pass. [README.md](README.md) defines every key.",
        _table(["result", "date", "machine"] + [header for header, _, _ in THROUGHPUT_COLUMNS],
               throughput_rows(grouped["throughput"])),
        "## Quick budget (`bench/quick_budget.py`)",
        "Wall and CPU seconds of `dvc exp run -S preset=P -S budget=quick` on the synthetic set in a fresh "
        "scratch copy (download, range test, training, evaluation, report), per preset.",
        _table(["result", "date", "machine", "threads", "preset", "wall s", "CPU s", "load avg", "test accuracy"],
               quick_budget_rows(grouped["quick_budget"])),
        "## Two queued experiments side by side (`bench/queue_slots.py`)",
        "Wall seconds of two quick-budget experiments of assignment 7 (synthetic data) through `dvc queue start -j 1` "
        "and `-j 2`, each mode in a fresh scratch copy, and the share of the machine each train stage took.",
        _table(["result", "date", "machine", "experiments", "jobs", "wall s", "load avg", "train stages' shares",
                "speed-up"], queue_slots_rows(grouped["queue_slots"])),
        "## Full runs (`bench/full_run.py`)",
        "Test accuracy (%) of a preset's whole run on real images, from its evaluate stage, plain and with each "
        "test-time augmentation, and the train stage's seconds (the sum of its epochs); the README's preset "
        "table shows the mean per preset.",
        _table(["result", "date", "machine", "threads", "preset", "seed", "epochs", "accuracy", "TTA", "train s",
                "images/s", "commit"], full_run_rows(grouped["full_run"])),
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the page is stale")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    return sync_generated(args.page, render(args.results), args.check, "python bench/results.py")


if __name__ == "__main__":
    sys.exit(main())
