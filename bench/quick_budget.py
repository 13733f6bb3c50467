"""Wall time of the quick budget per preset: `dvc exp run -S preset=P -S budget=quick` on the
synthetic set, each preset in a fresh scratch git copy of this checkout (its tracked files plus the
working tree's changes), so every run pays what a new user's first run pays: the download stage,
the range test, training, evaluation and the report.

    python bench/quick_budget.py                        # every preset in conf/preset/
    python bench/quick_budget.py assignment7 session11  # some of them
    python bench/quick_budget.py --keep /tmp/quick      # keep the scratch copies there

It prints one line per preset: wall seconds, CPU seconds of all its processes (user + sys), the
1-minute load average before and after (other jobs on the machine inflate the wall time; the CPU
seconds less so), the test accuracy and the max LR training used. It asserts nothing; with
`--json PATH` it also writes the runs there, e.g. into bench/results/ for bench/RESULTS.md
(`python bench/results.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_cpu   # bench/machine.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def scratch_copy(work: Path) -> None:
    """The checkout's tracked and untracked-but-not-ignored files under `work`, committed in a new git repo."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=bench@example.com", "-c", "user.name=bench", "commit", "-qm", "scratch"]):
        subprocess.run(cmd, cwd=work, check=True, capture_output=True)


def run_preset(preset: str, work: Path, env: dict) -> dict:
    scratch_copy(work)
    load_before = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(["dvc", "exp", "run", "-S", f"preset={preset}", "-S", "budget=quick",
                             "-S", "data.source=synthetic"], cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu_after.ru_utime - cpu_before.ru_utime + cpu_after.ru_stime - cpu_before.ru_stime
    (work / "quick_budget.log").write_text(result.stdout + result.stderr)
    run = {"preset": preset, "wall_seconds": wall, "cpu_seconds": cpu, "load_before": load_before,
           "load_after": os.getloadavg()[0], "ok": result.returncode == 0}
    if result.returncode != 0:
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("error", "ERROR"))]
        return {**run, "error": " | ".join(errors) or f"see {work / 'quick_budget.log'}"}
    return {**run, "test_accuracy": json.loads((work / "metrics/test.json").read_text())["accuracy"],
            "max_lr": json.loads((work / "metrics/training.json").read_text())["max_lr"]}


def describe(run: dict) -> str:
    line = (f"{run['preset']}: {run['wall_seconds']:.1f} s wall, {run['cpu_seconds']:.1f} s CPU, "
            f"load {run['load_before']:.1f} -> {run['load_after']:.1f}")
    if not run["ok"]:
        return f"{line}, FAILED: {run['error']}"
    return f"{line}, test accuracy {run['test_accuracy']:.3f}, max_lr {run['max_lr']:.3g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="presets to run (default: every file of conf/preset/)")
    parser.add_argument("--keep", type=Path, help="make the scratch copies under this folder and keep them")
    parser.add_argument("--json", type=Path, help="also write the runs to this file (for bench/results/)")
    args = parser.parse_args()
    presets = args.presets or sorted(path.stem for path in (REPO / "conf" / "preset").glob("*.yaml"))
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")   # this venv's dvc and python
    root = args.keep or Path(tempfile.mkdtemp(prefix="quick_budget_"))
    runs = []
    try:
        for preset in presets:
            work = root / preset
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            runs.append(run_preset(preset, work, env))
            print(describe(runs[-1]), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "bench": "quick_budget", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": describe_cpu(), "cpu_count": os.cpu_count(), "threads": env.get("OMP_NUM_THREADS", "default"),
            "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
