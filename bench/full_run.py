"""Record a preset's full run from the outputs its evaluate stage left in a workspace: the source of
the preset table's "measured" column and of bench/RESULTS.md's "Full runs".

    dvc exp run -n a8 -S preset=assignment8 -S data.url=... -S data.md5=...   # the run, on real images
    python bench/full_run.py --json bench/results/<date>-<machine>-run-assignment8.json
    python bench/results.py && python -m cifarlab preset-table                # the pages from the files

It reads params.yaml, metrics/test.json, metrics/training.json and metrics/train_speed.json of the
workspace (`--workspace`, default here), which `dvc exp run` fills with the experiment it ran. A run on
the synthetic set, on a subset, or under a budget other than `full` is refused with one line: its
accuracy says nothing about the preset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "src")]     # bench/ and this checkout's library

from cifarlab.atomic import write_json  # noqa: E402  (after the paths above)
from machine import describe_cpu  # noqa: E402

BENCH_NAME = "full_run"


def _read(workspace: Path, name: str) -> dict:
    path = workspace / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {path}: {err}; run the pipeline through evaluate first") from None


# The sections that make a preset's recipe, and the keys in them a full run may set itself.
RECIPE = ("model", "augment", "optim", "train", "evaluate")
FREE = {"train.seed"}


def recipe_changes(params: dict) -> list[str]:
    """`key value (preset's value)` for each recipe key where `params` differs from its preset composed
    today (keys only one side has are left out: a run from before a key existed)."""
    import yaml
    from cifarlab.config.compose import compose_text

    preset = yaml.safe_load(compose_text([f"preset={params['report']['preset']}"], BENCH.parent / "conf"))
    return [f"{section}.{key} {params[section][key]} (preset {value})"
            for section in RECIPE for key, value in preset[section].items()
            if key in params[section] and params[section][key] != value and f"{section}.{key}" not in FREE]


def record(workspace: Path) -> dict:
    """The result of the run whose outputs are in `workspace`; SystemExit (one line) if it is no full run."""
    import yaml

    params = yaml.safe_load((workspace / "params.yaml").read_text())
    data, budget = params["data"], (params.get("budget") or {}).get("name", "full")
    if data["source"] == "synthetic":
        raise SystemExit("error: data.source is `synthetic`: a full run is recorded on real images only")
    if data.get("train_subset") or data.get("test_subset"):
        raise SystemExit("error: data.train_subset/test_subset are set: a full run uses every image")
    if budget != "full":
        raise SystemExit(f"error: budget is `{budget}`: a full run is recorded under the `full` budget only")
    changed = recipe_changes(params)
    if changed:
        raise SystemExit(f"error: params.yaml differs from preset `{params['report']['preset']}` in "
                         f"{', '.join(changed)}: a full run is the preset as it is (train.seed aside)")
    test, training = _read(workspace, "metrics/test.json"), _read(workspace, "metrics/training.json")
    speed = _read(workspace, "metrics/train_speed.json")
    if training["epochs"] != params["train"]["epochs"] or len(speed["epoch_seconds"]) != training["epochs"]:
        raise SystemExit(f"error: metrics/training.json has {training['epochs']} epochs, params.yaml's train.epochs "
                         f"{params['train']['epochs']}: the metrics are not this configuration's full run")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=workspace, capture_output=True, text=True)
    return {
        "bench": BENCH_NAME, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": describe_cpu(), "cpu_count": os.cpu_count(), "device": speed.get("device"),
        "cuda_device": speed.get("cuda_device"), "precision": speed.get("precision"), "threads": speed.get("threads"),
        "preset": params["report"]["preset"], "commit": commit.stdout.strip() or None,
        "data": {"source": data["source"], "md5": data.get("md5")},
        "seed": params["train"]["seed"], "epochs": training["epochs"], "max_lr": training["max_lr"],
        "accuracy": test["accuracy"],
        "tta": {name: value["accuracy"] for name, value in test.items() if name.startswith("tta_")},
        "train_seconds": round(sum(speed["epoch_seconds"]), 1), "images_per_second": speed["images_per_second"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("."))
    parser.add_argument("--json", type=Path, required=True, help="the result file to write (bench/results/...)")
    args = parser.parse_args(argv)
    result = record(args.workspace)
    write_json(args.json, result)
    print(f"{args.json}: {result['preset']} seed {result['seed']}, {result['accuracy']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
