"""Queued experiments that DVC shows as Running though nothing runs them any more, and the way back.

    python -m cifarlab queue              # one line per stuck task: what happened, how to queue it again
    python -m cifarlab queue --clean      # remove them from the queue, delete their copies, print the requeue commands
    python -m cifarlab queue --requeue    # --clean, then run those commands (`dvc queue start` runs them)

When a queue worker dies (an out-of-memory kill, a reboot, `kill -9`), nothing tells DVC: `dvc queue
status` and `dvc exp show` keep its task as Running, a new `dvc queue start` skips it, and its copy of
the repo under .dvc/tmp/exps/ stays. A task is stuck when the `dvc exp exec-run` process DVC recorded
for it is gone (or its pid is another program's now) and no live worker of this queue reports it.
Its requeue command is `dvc exp run --queue` with its name and the `-S` overrides that compose its
params.yaml from conf/ as it is now (checked by composing them: DVC keeps no record of the overrides).
A run that went on to the end after its worker died (only the worker was killed) is collected
instead, as the worker would have: its experiment's ref is fetched from its copy. A copy some process
still works in is never touched, and a copy no task uses is deleted only while no worker is alive.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from cifarlab.config.compose import compose_text
from cifarlab.errors import CifarlabError

GROUPS = {"preset": "report.preset", "budget": "budget.name"}   # a group of conf/ -> the key that names its choice
NOT_CODE = ("params.yaml", "dvc.lock", ".dvc/tmp/")   # what a stash commit changes besides the workspace's code


@dataclass
class Stuck:
    """A task DVC shows as Running with nothing left to run it."""

    rev: str                       # the stash commit: `dvc queue status` shows its first 7 digits
    name: Optional[str]
    pid: Optional[int]             # the `dvc exp exec-run` process DVC recorded (None: it never started)
    copy: Optional[Path]           # its copy of the repo under .dvc/tmp/exps/, if it is still there
    requeue: Optional[list[str]] = None   # `dvc exp run --queue ...` that queues it again (None: not derived)
    notes: list[str] = field(default_factory=list)
    result_ref: Optional[str] = None      # its run finished: the experiment's ref in its copy, never collected
    busy: list[int] = field(default_factory=list)   # processes still working in its copy

    @property
    def task(self) -> str:
        return f"task {self.rev[:7]}" + (f" ({self.name})" if self.name else "")


# --- processes -------------------------------------------------------------------------------------

def _cmdline(pid: int) -> Optional[str]:
    """The process's command line; "" for a zombie, a kernel thread or no process; None where /proc
    cannot tell (not Linux). It reads empty for a moment after an exec as well: read again then."""
    if not Path("/proc/self").exists():
        return None
    for _ in range(50):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return ""
        except OSError:
            return None
        if cmdline or stat[stat.rindex(")") + 2:][:1] == "Z":
            return cmdline.replace(b"\0", b" ").decode(errors="replace")
        time.sleep(0.01)
    return ""


def runs(pid: Optional[int], marker: str) -> bool:
    """True when process `pid` is alive and is the one meant (its command line holds `marker`); a pid
    the kernel gave to another program since is not. Without /proc, alive is taken as meant."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:         # alive, another user's: /proc says whose it is
        pass
    cmdline = _cmdline(pid)
    return True if cmdline is None else marker in cmdline


def workers_in(folder: Path) -> list[int]:
    """The processes (but this one) whose working directory is in `folder`; none where /proc cannot tell."""
    inside, found = str(folder.resolve()), []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (cwd == inside or cwd.startswith(inside + os.sep)) and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return sorted(found)


def _live_worker_tasks(queue) -> Optional[set[str]]:
    """The stash revs the live workers of this queue report active; None when no worker is alive
    (asking costs a second of waiting for replies, so it is skipped then)."""
    from dvc_task.proc.process import ProcessInfo

    node = "dvc-exp-" + hashlib.sha256(queue.wdir.encode("utf-8")).hexdigest()[:6]   # DVC's worker node names
    alive = False
    for info in Path(queue.wdir).glob("dvc-exp-worker-*.json"):
        try:
            alive = alive or runs(ProcessInfo.load(str(info)).pid, node)
        except (OSError, ValueError, TypeError):
            continue
    if not alive:
        return None
    active = json.dumps(queue.worker_status(), default=str)
    return set(re.findall(r"[0-9a-f]{40}", active))


# --- the task's params, as a requeue command ----------------------------------------------------------

def _yaml(text: str) -> Any:
    from ruamel.yaml import YAML   # as DVC reads params.yaml (YAML 1.2)

    return YAML(typ="safe").load(text)


BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_./:-]*")
NOT_STRINGS = {"true", "false", "null", "inf", "nan", "on", "off", "yes", "no"}


def override_value(value: Any) -> str:
    """`value` in Hydra's override grammar, so that `-S key=<it>` gives back exactly `value`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{override_value(item)}" for key, item in value.items()) + "}"
    text = str(value)
    if BARE.fullmatch(text) and text.lower() not in NOT_STRINGS:
        return text
    quoted = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)    # Hydra: a backslash is escaped only
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, quoted) + "'"   # before a quote or at the end


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {name: leaf for key, item in value.items() for name, leaf in _leaves(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def overrides_for(params_text: str, conf: Path) -> Optional[list[str]]:
    """The `-S` overrides that make `dvc exp run` compose `params_text` from `conf` (the presets and
    budgets it names, then every key that still differs), or None when no such list reproduces it."""
    if not (conf / "config.yaml").is_file():
        return None
    wanted = _yaml(params_text)
    default = _yaml(compose_text([], conf))
    target, defaults, groups = _leaves(wanted), _leaves(default), []
    for group, key in GROUPS.items():
        chosen = target.get(key)
        if isinstance(chosen, str) and chosen != defaults.get(key) and (conf / group / f"{chosen}.yaml").is_file():
            groups.append(f"{group}={chosen}")
    base = _leaves(_yaml(compose_text(groups, conf))) if groups else defaults
    keys = [(f"{key}={override_value(value)}" if key in base else f"+{key}={override_value(value)}")
            for key, value in target.items() if key not in base or base[key] != value]
    keys += [f"~{key}" for key in base if key not in target]
    overrides = groups + keys
    try:
        if _yaml(compose_text(overrides, conf)) == wanted:
            return overrides
    except Exception:  # noqa: BLE001 - Hydra refuses the list: it cannot reproduce these params
        pass
    return None


def requeue_command(name: Optional[str], overrides: list[str]) -> list[str]:
    return ["dvc", "exp", "run", "--queue", *(["-n", name] if name else []),
            *[part for item in overrides for part in ("-S", item)]]


def _git(root: Path, *args: str) -> Optional[str]:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def _requeue_and_notes(root: Path, rev: str, name: Optional[str], baseline: str, copy: Optional[Path]):
    text = _git(root, "show", f"{rev}:params.yaml")
    if text is None and copy is not None and (copy / "params.yaml").is_file():
        text = (copy / "params.yaml").read_text()          # the stash commit is gone: its copy holds the same file
    notes = []
    overrides = overrides_for(text, root / "conf") if text is not None else None
    if overrides is None:
        notes.append(f"its params cannot be composed from conf/ as it is now (they are in `git show {rev[:7]}:params."
                     f"yaml`)")
    head = (_git(root, "rev-parse", "HEAD") or "").strip()
    if head and baseline and head != baseline:
        notes.append(f"it was queued on {baseline[:7]}, HEAD is now {head[:7]}: queued again, it runs HEAD's code")
    differ = [path for path in (_git(root, "diff", "--name-only", rev) or "").splitlines()
              if path and not path.startswith(NOT_CODE) and not path.endswith(".dvc")]
    if differ:
        notes.append(f"its queued copy held other files than the workspace does now ({', '.join(differ[:3])}"
                     f"{', ...' if len(differ) > 3 else ''})")
    return (requeue_command(name, overrides) if overrides is not None else None), notes


# --- finding and cleaning -----------------------------------------------------------------------------

def _shown(root: Path, path: Path) -> str:
    """`path` from `root`, with the megabytes its files take."""
    size = sum(os.lstat(os.path.join(base, file)).st_size for base, _, files in os.walk(path) for file in files)
    return f"{path.relative_to(root) if path.is_relative_to(root) else path} ({size / 1e6:.1f} MB)"


def find_stuck(repo) -> tuple[list[Stuck], list[Path]]:
    """(the stuck tasks, the copies under .dvc/tmp/exps/ that no task uses) of DVC repo `repo`."""
    from dvc.repo.experiments.executor.base import ExecutorInfo

    queue, root = repo.experiments.celery_queue, Path(repo.root_dir)
    stuck, used, asked, workers = [], set(), False, None
    for entry in list(queue.iter_active()):
        try:
            info = ExecutorInfo.load_json(queue.get_infofile_path(entry.stash_rev))
        except (OSError, ValueError, TypeError):
            info = None                    # it died setting up, before DVC wrote down where its copy is
        copy = Path(info.root_dir) if info is not None and info.root_dir else None
        if copy is not None:
            used.add(copy.resolve())
        proc = queue.proc.get(entry.stash_rev)
        if proc is not None and proc.returncode is None and runs(proc.pid, entry.stash_rev):
            continue                       # its `dvc exp exec-run` is running
        if not asked:
            asked, workers = True, _live_worker_tasks(queue)
        if workers is not None and entry.stash_rev in workers:
            continue                       # a live worker is setting it up or collecting it
        task = Stuck(entry.stash_rev, entry.name, proc.pid if proc is not None else None,
                     copy if copy is not None and copy.is_dir() else None)
        task.busy = workers_in(task.copy) if task.copy is not None else []
        if info is not None and info.result_hash and info.result_ref and task.copy is not None:
            task.result_ref = info.result_ref          # it ended well: only its worker's collection was lost
        else:
            task.requeue, task.notes = _requeue_and_notes(root, entry.stash_rev, entry.name, entry.baseline_rev,
                                                          task.copy)
        stuck.append(task)
    leaked = []
    exps = root / ".dvc" / "tmp" / "exps"
    if exps.is_dir() and not asked:
        asked, workers = True, _live_worker_tasks(queue)
    if exps.is_dir() and workers is None:
        leaked = [path for path in sorted(exps.glob("tmp*")) if path.is_dir() and path.resolve() not in used
                  and not workers_in(path)]
    return stuck, leaked


def _collect(root: Path, task: Stuck) -> None:
    """Bring a finished run's experiment into the repo, as its worker would have: DVC fetches the
    experiment's ref from the copy (whose DVC cache is the repo's own, so the outputs are there)."""
    ref, copy = task.result_ref, task.copy
    have = _git(root, "rev-parse", "--verify", "--quiet", ref)
    theirs = _git(copy, "rev-parse", "--verify", "--quiet", ref)
    if have is not None and have == theirs:
        return                             # brought in already
    result = subprocess.run(["git", "fetch", "--quiet", "--no-tags", str(copy), f"{ref}:{ref}"], cwd=root,
                            capture_output=True, text=True)
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise CifarlabError(f"cannot bring its result in (`git fetch {copy} {ref}:{ref}`: {said})")


def remove_task(repo, task: Stuck) -> None:
    """Take `task` out of DVC's queue as `dvc queue kill` + `dvc queue remove` would, without
    signalling its recorded pid (after a reboot that pid may be another program's), then delete its
    copy and its process records under .dvc/tmp/exps/run/. A finished run's result is collected first."""
    queue = repo.experiments.celery_queue
    if task.result_ref:
        _collect(Path(repo.root_dir), task)
    proc = queue.proc.get(task.rev)
    if proc is not None and proc.returncode is None:
        proc.returncode = -1               # what DVC itself records for a process found gone
        queue.proc[task.rev] = proc        # so `kill` below signals nothing and marks the task failed
    queue.kill([task.rev], force=True)
    queue.remove([task.rev])
    if task.copy is not None:
        shutil.rmtree(task.copy, ignore_errors=True)
    shutil.rmtree(Path(queue.get_infofile_path(task.rev)).parent, ignore_errors=True)


def _experiment(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]          # refs/exps/<baseline, 2 + 38 digits>/<name>


def _report(repo, root: Path, task: Stuck, clean: bool, out) -> bool:
    """Print the task's line; with `clean`, remove it first. False when it is left as it is."""
    from dvc.exceptions import DvcException

    gone = f"its process {task.pid} is gone" if task.pid else "its worker is gone (it died setting the run up)"
    line = f"{task.task} shows Running but {gone}" + "".join(f"; {note}" for note in task.notes)
    command = shlex.join(task.requeue) if task.requeue else "(none reproduces its params: see above)"
    copy = f" {_shown(root, task.copy)}" if task.copy is not None else ""
    if task.busy:
        print(f"{line}, yet processes {', '.join(map(str, task.busy))} still work in its copy{copy}: left as it is; "
              f"end them, then run this again", file=out)
        return False
    if not clean:
        if task.result_ref:
            print(f"{line}: its run finished, only its collection was lost; `python -m cifarlab queue --clean` "
                  f"brings it in as experiment {_experiment(task.result_ref)} and removes the task and its copy{copy}",
                  file=out)
        else:
            print(f"{line}: nothing will finish it; `python -m cifarlab queue --clean` removes it"
                  f"{' and its copy' + copy if copy else ''}, then `{command}` queues it again (--requeue does both)",
                  file=out)
        return False
    try:
        remove_task(repo, task)
    except (CifarlabError, DvcException) as err:
        print(f"{line}: left as it is: {err}", file=out)
        return False
    deleted = f", its copy{copy} deleted" if copy else ""
    if task.result_ref:
        print(f"{line}: its run had finished and is now experiment {_experiment(task.result_ref)}; removed from the "
              f"queue{deleted}", file=out)
    else:
        print(f"{line}: removed from the queue{deleted}; queue it again with: {command}", file=out)
    return True


def recover(root: Path, clean: bool, requeue: bool, out=sys.stdout) -> int:
    """Print one line per stuck task and leaked copy; with `clean` (or `requeue`), remove them; with
    `requeue`, queue each removed task again. 0 when nothing is stuck or all of it was dealt with."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    clean = clean or requeue
    try:
        repo = Repo(str(root))
    except NotDvcRepoError:
        raise CifarlabError(f"{root.resolve()} is not inside a DVC repository; run this in the repository whose "
                            f"`dvc queue status` shows the task, or pass --repo") from None
    with repo:
        root = Path(repo.root_dir)
        stuck, leaked = find_stuck(repo)
        if not stuck and not leaked:
            print("nothing is stuck: every task `dvc queue status` shows as Running has its process alive", file=out)
            return 0
        removed = [task for task in stuck if _report(repo, root, task, clean, out)]
        for path in leaked:
            shown = _shown(root, path)
            if clean:
                shutil.rmtree(path, ignore_errors=True)
            print(f"leaked copy {shown}: no task uses it; " + ("deleted" if clean else
                  "`python -m cifarlab queue --clean` deletes it"), file=out)
    failed = len(removed) < len(stuck) or not clean
    for task in removed if requeue else []:
        if task.requeue is None:
            failed |= task.result_ref is None
            continue
        out.flush()                        # before DVC's own line, which it writes to the same stdout
        failed |= subprocess.run([sys.executable, "-m", "dvc", *task.requeue[1:]], cwd=root).returncode != 0
    if requeue and any(task.requeue for task in removed):
        print("`dvc queue start` runs the requeued tasks", file=out)
    return int(failed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifarlab queue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", action="store_true", help="remove the stuck tasks from the queue (a finished "
                        "run's result collected first) and delete their copies and any leaked one")
    parser.add_argument("--requeue", action="store_true", help="--clean, then queue each removed task again")
    parser.add_argument("--repo", type=Path, default=Path("."),
                        help="the DVC repository (default: the current directory)")
    args = parser.parse_args(argv)
    try:
        return recover(args.repo, args.clean, args.requeue)
    except CifarlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
