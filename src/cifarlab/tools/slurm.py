"""SLURM's part of a sweep (`cifarlab.tools.sweep`): the job's request as `#SBATCH` lines, submitting
with `sbatch`, and the array tasks' states from `sacct` (or `squeue` where accounting is off).

The rest of a sweep's job script (clone, `dvc exp run`, push) is the same for every scheduler: to
run sweeps elsewhere, replace what this module does (docs/sweeps.md says what each piece maps to).
"""

from __future__ import annotations

import argparse
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cifarlab.errors import CifarlabError

INDEX = "SLURM_ARRAY_TASK_ID"        # the array index, in the job's environment
JOB_ID = "SLURM_ARRAY_JOB_ID"
CPUS = "SLURM_CPUS_PER_TASK"
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
TIME_LIMIT = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass
class Options:
    """The job's request: one `#SBATCH` line each; None (gres: "none") leaves the line out."""
    time: str = "02:00:00"
    gres: Optional[str] = "gpu:1"
    partition: Optional[str] = None
    cpus_per_task: int = 8
    mem: Optional[str] = None
    max_parallel: Optional[int] = None
    signal_lead: int = 120            # seconds before the time limit: SIGUSR1, and the job stops cleanly
    sbatch_args: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, args: argparse.Namespace) -> "Options":
        """The options `add_arguments` parsed, checked."""
        options = cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})
        options.check()
        return options

    def check(self) -> None:
        if self.cpus_per_task < 1 or (self.max_parallel is not None and self.max_parallel < 1):
            raise CifarlabError("--cpus-per-task and --max-parallel must be at least 1")
        if not 0 < self.signal_lead < seconds(self.time):
            raise CifarlabError(f"--signal-lead {self.signal_lead} s; allowed: more than 0 and less than --time "
                                f"{self.time} ({seconds(self.time)} s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's request as command-line options, one per field of `Options`."""
    o = Options
    parser.add_argument("--time", default=o.time, help="each job's time limit (default: %(default)s)")
    parser.add_argument("--gres", default=o.gres, help="generic resources per job; none: no line (default: %(default)s)")
    parser.add_argument("--partition", help="the partition (default: the cluster's default)")
    parser.add_argument("--cpus-per-task", type=int, default=o.cpus_per_task, help="CPUs per job (default: %(default)s)")
    parser.add_argument("--mem", help="memory per job, as sbatch --mem takes it (default: the cluster's default)")
    parser.add_argument("--max-parallel", type=int, help="at most this many jobs at once (the array's %%N)")
    parser.add_argument("--signal-lead", type=int, default=o.signal_lead,
                        help="seconds before the time limit at which a job stops cleanly (default: %(default)s)")
    parser.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[], metavar="ARG",
                        help="one more #SBATCH line, e.g. --sbatch-arg=--account=lab; repeatable")


def seconds(limit: str) -> int:
    """SLURM's --time (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds."""
    match = TIME_LIMIT.match(limit)
    if not match:
        raise CifarlabError(f"--time {limit!r} is not a SLURM time limit; allowed: MINUTES, MM:SS, HH:MM:SS, "
                            "D-HH, D-HH:MM or D-HH:MM:SS")
    days, *rest = match.groups()
    parts = [int(p) for p in rest if p is not None]
    if days is not None:                # D-H, D-H:M, D-H:M:S
        parts = [int(days) * 24 + parts[0], *parts[1:], 0, 0][:3]
    units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
    return sum(part * unit for part, unit in zip(parts, units))


def header(options: Options, name: str, count: int, logs: Path) -> list[str]:
    """The `#SBATCH` lines of an array job of `count` tasks, task i logging to logs/i.log (appended to,
    so a resubmitted task's log holds every attempt)."""
    o = options
    array = f"0-{count - 1}" + (f"%{o.max_parallel}" if o.max_parallel else "")
    lines = [f"--job-name=cifarlab-{name}", f"--array={array}", f"--output={logs / '%a.log'}", "--open-mode=append",
             f"--time={o.time}", f"--cpus-per-task={o.cpus_per_task}"]
    lines += [f"--gres={o.gres}"] if o.gres and o.gres != "none" else []
    lines += [f"--partition={o.partition}"] if o.partition else []
    lines += [f"--mem={o.mem}"] if o.mem else []
    lines += [f"--signal=B:USR1@{o.signal_lead}", *o.sbatch_args]
    return [f"#SBATCH {line}" for line in lines]


def submit(script: Path, indices: Optional[list[int]] = None) -> str:
    """`sbatch` the script (only the array `indices`, when given); the job id."""
    cmd = ["sbatch", "--parsable", *([f"--array={','.join(map(str, indices))}"] if indices is not None else []), str(script)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise CifarlabError("`sbatch` is not installed here (on PATH); submit from a machine of the cluster") from None
    if result.returncode != 0:
        raise CifarlabError(f"`{' '.join(cmd)}` failed: {' '.join(result.stderr.split()) or result.returncode}")
    return result.stdout.strip().split(";")[0]      # "id" or "id;cluster"


def parse_states(text: str) -> dict[int, str]:
    """`JOBID|STATE` lines of sacct or squeue (`12_3`, or `12_[4-6,8%2]` for tasks not started yet)
    -> array index: state (its first word: `CANCELLED by 0` is CANCELLED)."""
    states = {}
    for line in text.splitlines():
        match = re.match(r"^\d+_(\d+|\[[^\]]*\])\|(\S+)", line.strip())
        if not match:
            continue
        tasks, state = match.groups()
        for part in tasks.strip("[]").split("%")[0].split(","):
            low, _, high = part.partition("-")
            for index in range(int(low), int(high or low) + 1):
                states[index] = state
    return states


def _query(cmd: list[str]) -> Optional[str]:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return result.stdout if result.returncode == 0 else None


def job_states(job: str) -> dict[int, str]:
    """A job's array tasks and their states: from sacct, or from squeue where accounting is off (it
    knows finished jobs only for the controller's MinJobAge); {} where neither knows the job."""
    found = parse_states(_query(["sacct", "-n", "-P", "-X", "-j", job, "-o", "JobID,State"]) or "")
    return found or parse_states(_query(["squeue", "-h", "-r", "--states=all", "-j", job, "-o", "%i|%T"]) or "")
