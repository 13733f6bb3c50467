"""Wall time of two queued experiments with `dvc queue start -j 2` against `-j 1`: what running them
side by side gains once each run trains on its own share of the machine (`cifarlab.engine.slots`:
a GPU each while GPUs are free, else the cores divided between the runs training).

    python bench/queue_slots.py                        # assignment 7, quick budget, a larger subset and 4 epochs
    python bench/queue_slots.py --smoke                # the smallest size: checks that the bench works
    python bench/queue_slots.py --json bench/results/<date>-<machine>-queue.json

Each mode runs in a fresh scratch git copy of this checkout (`quick_budget.scratch_copy`: its
tracked files plus the working tree's changes), so neither finds the other's results in a DVC
cache: the two experiments (train.seed 1 and 2, synthetic data, assignment 7's network) are queued
with `dvc exp run --queue`, then `dvc queue start -j N` runs them, and the wall time runs from the
start to the first `dvc queue status` (asked every `--poll` seconds) that sees both ended. It
prints one line per mode (wall seconds, the 1-minute load average before and after, what each
run's train stage said about its share) and the speed-up; `--json PATH` also writes them, for
bench/results/ and bench/RESULTS.md (`python bench/results.py`). It asserts nothing and writes
nothing into the repository. The figures need a machine nothing else uses while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_cpu          # bench/machine.py (this script's folder is on sys.path)
from quick_budget import scratch_copy      # bench/quick_budget.py: the checkout in a fresh git repo

REPO = Path(__file__).resolve().parents[1]
SEEDS = (1, 2)                             # the two experiments
BASE = ["preset=assignment7", "budget=quick", "data.source=synthetic"]
FULL = ["data.train_subset=1280", "train.epochs=4"]   # 40 steps an epoch: training, not start-up, dominates
SMOKE = ["train.epochs=1"]                 # the quick budget's 320 images, one epoch
SLOT_LINE = re.compile(r"^(train|lr_find): (.* cores: .*|GPUs? .* of .*|waiting for .*)$")


def tasks(work: Path, env: dict) -> list[list[str]]:
    """`dvc queue status` -> rows of [task, (name,) created, status]."""
    lines = subprocess.run(["dvc", "queue", "status"], cwd=work, env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return [line.split() for line in lines[1:] if line.strip() and not line.startswith("Worker status")]


def run_mode(jobs: int, work: Path, overrides: list[str], env: dict, poll: float, timeout: float) -> dict:
    scratch_copy(work)
    for seed in SEEDS:
        subprocess.run(["dvc", "exp", "run", "--queue", *[arg for o in overrides for arg in ("-S", o)],
                        "-S", f"train.seed={seed}"], cwd=work, env=env, check=True, capture_output=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    # Not waited for with a pipe: the workers it starts outlive it and would hold the pipe open.
    subprocess.run(["dvc", "queue", "start", "--jobs", str(jobs)], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: list[list[str]] = []
    try:
        while time.perf_counter() - started < timeout:
            rows = tasks(work, env)
            if rows and all(row[-1] in ("Success", "Failed") for row in rows):
                break
            time.sleep(poll)
        wall = time.perf_counter() - started
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=work, env=env, capture_output=True)
    logs = {row[0]: subprocess.run(["dvc", "queue", "logs", row[0]], cwd=work, env=env, capture_output=True,
                                   text=True).stdout for row in rows}
    (work / "queue_slots.log").write_text("\n".join(f"--- {task}\n{log}" for task, log in logs.items()))
    ended = all(row[-1] in ("Success", "Failed") for row in rows) and rows
    return {"jobs": jobs, "wall_seconds": wall, "load_before": load_before, "load_after": os.getloadavg()[0],
            "ok": bool(ended) and all(row[-1] == "Success" for row in rows),
            "status": {row[0]: row[-1] for row in rows} if ended else f"not done after {timeout:.0f} s",
            "slots": {task: [line for line in log.splitlines() if SLOT_LINE.match(line)]
                      for task, log in logs.items()}}


def describe(mode: dict) -> str:
    line = (f"-j {mode['jobs']}: {mode['wall_seconds']:.1f} s wall for {len(SEEDS)} experiments, "
            f"load {mode['load_before']:.1f} -> {mode['load_after']:.1f}")
    if not mode["ok"]:
        return f"{line}, FAILED: {mode['status']}"
    trains = [line for lines in mode["slots"].values() for line in lines if line.startswith("train: ")]
    return f"{line}; " + " | ".join(trains)


def cuda_devices() -> str | None:
    """`N x <name>` of the GPUs torch sees here, or None without CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"{count} x {torch.cuda.get_device_name(0)}" if count else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the smallest size (one epoch of the quick budget)")
    parser.add_argument("--jobs", type=int, default=2, help="the parallel mode's `dvc queue start -j` (default 2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another -S override for both experiments (repeatable)")
    parser.add_argument("--poll", type=float, default=3.0, help="seconds between `dvc queue status` (default 3)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up on a mode after this many seconds")
    parser.add_argument("--keep", type=Path, help="make the scratch copies under this folder and keep them")
    parser.add_argument("--json", type=Path, help="also write the result to this file (for bench/results/)")
    args = parser.parse_args()
    overrides = BASE + (SMOKE if args.smoke else FULL) + args.set
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")   # this venv's dvc and python
    root = args.keep or Path(tempfile.mkdtemp(prefix="queue_slots_"))
    modes = []
    try:
        for jobs in (1, args.jobs):
            work = root / f"jobs-{jobs}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            modes.append(run_mode(jobs, work, overrides, env, args.poll, args.timeout))
            print(describe(modes[-1]), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    speedup = modes[0]["wall_seconds"] / modes[1]["wall_seconds"] if all(m["ok"] for m in modes) else None
    print(f"speed-up of -j {args.jobs} over -j 1: " + (f"{speedup:.2f}x" if speedup else "n/a (a mode failed)"))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "bench": "queue_slots", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": describe_cpu(), "cpu_count": os.cpu_count(), "cuda_device": cuda_devices(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": env.get("OMP_NUM_THREADS", "default"),
            "smoke": args.smoke, "overrides": overrides, "experiments": len(SEEDS), "modes": modes,
            "speedup": speedup}, indent=2) + "\n")
    return 0 if all(m["ok"] for m in modes) else 1


if __name__ == "__main__":
    sys.exit(main())
