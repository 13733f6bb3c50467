"""End to end: a queue worker killed mid-run (as an out-of-memory kill or a reboot would) leaves no
training process, and `python -m cifarlab queue` finds the task DVC keeps showing as Running, cleans
it and its copy, and gives the command that queues it again, which then runs to the end.

The worker's process tree is found through /proc: the `dvc exp queue-worker` process of this repo and
every process of the process group DVC gives it (`dvc queue start`'s daemon, the worker, `dvc exp
exec-run`, the stage). All of them are killed with SIGKILL except the train stage itself, which must
then die with its parent (`cifarlab.lifetime.die_with_parent`): if it does, killing the whole tree
leaves nothing either.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_RUN, make_repo, processes_in, queue_tasks, run, tool_env, wait_until_none_left

pytestmark = [pytest.mark.e2e, pytest.mark.real_stage_processes]   # signals process groups, reads /proc

# Each changes a key only train reads (train.max_lr would rerun lr_find as well), so a queued run is
# train, evaluate and report.
CRASHED, CRASHED_SET = "crash-a", "train.div_factor=50"
NEXT, NEXT_SET = "next-b", "train.div_factor=20"
SECONDS_UNTIL_NOTHING_IS_LEFT = 5.0
QUEUE_ENV = {"OMP_NUM_THREADS": "1"}


def processes() -> dict[int, dict]:
    """Every process but this one: {pid: ppid, pgid, cmdline, cwd} (what /proc lets us read)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()        # after "pid (comm) ": state ppid pgrp ...
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            cwd = os.readlink(entry / "cwd")
        except (OSError, ValueError):
            continue                                            # gone, a zombie, or another user's
        table[pid] = {"ppid": int(fields[1]), "pgid": int(fields[2]), "cmdline": cmdline, "cwd": cwd}
    return table


def descendants(table: dict[int, dict], pid: int) -> set[int]:
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, proc in table.items() if proc["ppid"] in frontier} - found
        found |= frontier
    return found


def has_torch(pid: int) -> bool:
    """The stage has imported torch, so `run_stage` has armed `die_with_parent` (it does so before)."""
    try:
        return "torch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def training(work: Path, timeout: float = 300) -> tuple[int, dict[int, dict], set[int]]:
    """Once the queue worker's train stage is running: (the worker's pid, the process table then, the
    train stage's processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = processes()
        workers = [pid for pid, proc in table.items()
                   if "exp queue-worker" in proc["cmdline"] and proc["cwd"] == str(work)]
        for worker in workers:
            tree = descendants(table, worker)
            trains = [pid for pid in tree if "stages/train.py" in table[pid]["cmdline"] and has_torch(pid)]
            if trains:
                return worker, table, {pid for train in trains for pid in {train, *descendants(table, train)}}
            if any(f"stages/{later}.py" in table[pid]["cmdline"] for pid in tree for later in ("evaluate", "report")):
                break                                 # train ended before it was seen
        time.sleep(0.1)
    raise AssertionError(f"no queued train stage seen running:\n{run(['dvc', 'queue', 'status'], work).stdout}")


def kill_everything_in(work: Path) -> None:
    for line in processes_in(work):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def tool(work: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "cifarlab", "queue", *args], work, check=False)


def copies(work: Path) -> dict[str, int]:
    """The repo copies under .dvc/tmp/exps/ and their bytes."""
    return {path.name: sum(os.lstat(os.path.join(base, name)).st_size for base, _, files in os.walk(path)
                           for name in files)
            for path in sorted((work / ".dvc/tmp/exps").glob("tmp*"))}


def start_queue(work: Path) -> None:
    # Not waited for with a pipe: the worker it starts outlives it and would hold the pipe open.
    subprocess.run(["dvc", "queue", "start", "--jobs", "1"], cwd=work, env=tool_env() | QUEUE_ENV, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def test_a_killed_queue_worker_leaves_nothing_running_and_its_task_is_requeued(tmp_path):
    work = make_repo(tmp_path, TINY_RUN)
    run(["dvc", "repro"], work)                       # committed with its data: the queued copies reuse it
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "baseline run"], work)
    for name, override in ((CRASHED, CRASHED_SET), (NEXT, NEXT_SET)):
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", override], work)
    try:
        start_queue(work)
        worker, table, trains = training(work)
        group = table[worker]["pgid"]
        tree = {pid for pid, proc in table.items() if proc["pgid"] == group} | {worker, *descendants(table, worker)}
        exec_run = [pid for pid in tree if "exp exec-run" in table[pid]["cmdline"]]
        assert len(exec_run) == 1 and trains <= tree, (table, tree)
        for pid in sorted(tree - trains, key=lambda pid: len(descendants(table, pid)), reverse=True):
            try:
                os.kill(pid, signal.SIGKILL)              # the ancestors first, the train stage spared
            except ProcessLookupError:
                pass
        left, seconds = wait_until_none_left(work, timeout=30)
        print(f"killed the worker's tree ({len(tree - trains)} processes, not the {len(trains)} of train): "
              f"nothing left after {seconds:.2f} s")
        assert left == [] and seconds < SECONDS_UNTIL_NOTHING_IS_LEFT, left

        tasks = {row[1]: row for row in queue_tasks(work)}
        assert tasks[CRASHED][-1] == "Running" and tasks[NEXT][-1] == "Queued", tasks   # the bug: Running forever
        task = tasks[CRASHED][0]
        leaked = copies(work)
        assert len(leaked) == 1, leaked
        print(f"before: {task} Running, {len(leaked)} copy under .dvc/tmp/exps/: "
              + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in leaked.items()))

        command = f"dvc exp run --queue -n {CRASHED} -S {CRASHED_SET}"
        listed = tool(work)
        print(f"python -m cifarlab queue ->\n{listed.stdout}{listed.stderr}")
        assert listed.returncode == 1 and len(listed.stdout.splitlines()) == 1, listed
        line = listed.stdout.strip()
        assert line.startswith(f"task {task} ({CRASHED}) shows Running but its process {exec_run[0]} is gone"), line
        assert f"`{command}`" in line and f"{next(iter(leaked))} (" in line, line

        copy = work / ".dvc/tmp/exps" / next(iter(leaked))
        assert not (copy / "models/model.pt").exists()     # train was killed, it did not just finish in time

        cleaned = tool(work, "--requeue")                   # --clean, then the command it prints
        print(f"python -m cifarlab queue --requeue ->\n{cleaned.stdout}{cleaned.stderr}")
        assert cleaned.returncode == 0, cleaned
        assert cleaned.stdout.splitlines()[0].endswith(
            f"removed from the queue, its copy .dvc/tmp/exps/{copy.name} ({leaked[copy.name] / 1e6:.1f} MB) deleted; "
            f"queue it again with: {command}"), cleaned.stdout
        assert copies(work) == {}
        assert not [path for path in (work / ".dvc/tmp/exps/run").iterdir() if path.name.startswith(task)]
        tasks = {row[1]: row for row in queue_tasks(work)}
        print(f"after: {sorted(copies(work))} under .dvc/tmp/exps/; queue: {sorted(tasks.values())}")
        assert sorted((name, row[-1]) for name, row in tasks.items()) == [(CRASHED, "Queued"), (NEXT, "Queued")]
        assert tasks[CRASHED][0] != task
        params = [run(["git", "show", f"{rev}:params.yaml"], work).stdout for rev in (task, tasks[CRASHED][0])]
        assert params[0] == params[1] and "div_factor: 50" in params[0]     # queued again exactly as it was
        assert tool(work).stdout.startswith("nothing is stuck")
    finally:
        kill_everything_in(work)        # only a failure leaves anything: the queue was never started again
