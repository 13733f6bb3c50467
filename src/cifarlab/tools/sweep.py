"""Sweeps on a SLURM cluster: one array task per experiment, each a `dvc exp run` in its own clone.

    python -m cifarlab sweep submit seeds -S 'preset=assignment7,assignment10' -S 'train.seed=range(1,4)'
    python -m cifarlab sweep submit seeds -S 'train.seed=1,2' --dry-run   # print the sbatch script only
    python -m cifarlab sweep status seeds       # each experiment: SLURM state, on the git remote, outcome
    python -m cifarlab sweep collect seeds      # wait for the jobs, `dvc exp pull` them, compare
    python -m cifarlab sweep resubmit seeds     # submit again the experiments not on the git remote

`-S` sets are DVC's, sweeps included (expanded by DVC's own function), named `<sweep>-1`, `<sweep>-2`,
... as `dvc exp run --queue -n <sweep>` names them. Each task clones the shared git remote at the
committed baseline, runs `dvc exp run --pull` (data and run-cache from the project's default DVC
remote), uploads data and run-cache (`dvc push --run-cache`), and last the experiment's git ref
(`dvc exp push --no-cache`): an experiment is on the git remote whole or not at all. The script,
record, logs and each experiment's last outcome are under `.cache/sweeps/<name>/`. docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from cifarlab.atomic import write_text
from cifarlab.errors import CifarlabError
from cifarlab.tools import slurm

SWEEPS = Path(".cache") / "sweeps"


@dataclass
class Sweep:
    name: str
    baseline: str                       # the commit every experiment starts from
    git_remote: str                     # the URL the jobs clone from and push to
    folder: str                         # .cache/sweeps/<name>, absolute: the jobs write logs and outcomes there
    work: str                           # one clone per experiment, kept between attempts
    setup: str                          # shell lines that give a job `python` and `dvc`
    experiments: list[list[str]]        # each experiment's -S sets
    options: slurm.Options = field(default_factory=slurm.Options)
    jobs: list[dict] = field(default_factory=list)   # each submission: {"id", "indices", "submitted"}

    def exp_name(self, index: int) -> str:
        return f"{self.name}-{index + 1}"

    @property
    def script(self) -> Path:
        return Path(self.folder) / "sweep.sbatch"

    @property
    def outcomes(self) -> Path:
        return Path(self.folder) / "outcomes"


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def expand(sets: Sequence[str]) -> list[list[str]]:
    """`-S` sets -> each experiment's sets, as `dvc exp run --queue` expands them (DVC's function)."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps

    try:
        sweeps = get_hydra_sweeps(to_path_overrides(sets)) if sets else [{}]
    except Exception as err:   # noqa: BLE001  (Hydra's parse errors and DVC's InvalidArgumentError)
        raise CifarlabError(f"-S {' '.join(sets)}: {one_line(err)}") from None
    return [[s if path == "params.yaml" else f"{path}:{s}" for path, overrides in sweep.items() for s in overrides]
            for sweep in sweeps]


# The job's steps: the same for every scheduler (the header before them is SLURM's, from `slurm.header`).
JOB_STEPS = r'''
REF="refs/exps/${BASELINE:0:2}/${BASELINE:2}/$NAME"   # where `dvc exp push` puts the experiment
CLONE="$WORK/$NAME"
phase="starting" why="" child=""
say() { printf '[sweep %s] %s\n' "$(date '+%F %T')" "$*"; }
on_remote() { git ls-remote --exit-code "$GIT_REMOTE" "$REF" >/dev/null 2>&1; }
stop() {   # a signal: stop what runs (its whole process group), then fail with the reason
    why="$1"; say "$why: stopping ($phase)"
    [ -z "$child" ] || kill -TERM -- "-$child" 2>/dev/null
}
trap 'stop "time limit in $LEAD s (SIGUSR1)"' USR1
trap 'stop "cancelled (SIGTERM: scancel, preemption or the time limit)"' TERM
finish() {
    local rc=$? where="nothing of it is on the git remote"
    trap - EXIT USR1 TERM
    if [ "$rc" -eq 0 ]; then
        outcome="pushed: $NAME is on the git remote"
    else
        ! on_remote || where="its git ref is on the git remote all the same"
        outcome="failed: ${why:-exit status $rc} during $phase; $where; resubmit to resume: python -m cifarlab sweep resubmit $SWEEP"
    fi
    say "$outcome"
    mkdir -p "$OUTCOMES" && printf '%s\n' "$outcome" > "$OUTCOMES/.$NAME.tmp" && mv -f "$OUTCOMES/.$NAME.tmp" "$OUTCOMES/$NAME"
    exit "$rc"
}
trap finish EXIT
step() {   # step PHASE COMMAND...: COMMAND in a process group of its own, so a stop reaches all it starts
    phase="$1"; shift
    [ -z "$why" ] || exit 1
    say "$phase: $*"
    setsid "$@" & child=$!
    wait "$child"; local rc=$?
    while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done   # a trap interrupted the wait
    for _ in $(seq 30); do kill -0 -- "-$child" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$child" 2>/dev/null; child=""
    [ "$rc" -eq 0 ] || exit "$rc"
    [ -z "$why" ] || exit 1
}

say "job $JOB (index $INDEX) on $(hostname): $NAME ${SETS[*]}"
phase="setting up"
SETUP_LINES
export OMP_NUM_THREADS="$CPUS" DVC_NO_ANALYTICS=1 DVC_EXP_AUTO_PUSH=false   # the push is the steps below
if on_remote; then say "$NAME is already on the git remote: nothing to do"; exit 0; fi
if [ ! -d "$CLONE/.git" ]; then   # cloned aside, then renamed: a clone cut short is never used
    rm -rf "$CLONE.partial"; mkdir -p "$WORK"
    step "cloning" git clone -q --no-checkout "$GIT_REMOTE" "$CLONE.partial"
    mv "$CLONE.partial" "$CLONE"
fi
cd "$CLONE" || exit 1
if git show-ref -q --verify "$REF"; then   # an earlier attempt ran it to the end, and its push did not
    step "restoring the finished run" dvc exp apply "$NAME"
else   # an earlier attempt's untracked files go; ignored ones (.dvc/cache, .cache/train: the resume state) stay
    step "fetching the baseline" git fetch -q origin
    step "checking out the baseline" git checkout -q --force --detach "$BASELINE"
    step "cleaning" git clean -q -f -d
    step "running the experiment" dvc exp run --pull -n "$NAME" "${SETS[@]}"
fi
step "pushing data and run-cache to the DVC remote" dvc push --run-cache
step "pushing the experiment's git ref, last" dvc exp push --no-cache origin "$NAME"
'''


def job_script(sweep: Sweep) -> str:
    """The sbatch script: SLURM's request, what every task shares, each array index's experiment, the steps."""
    q = shlex.quote
    cases = [f"    {i}) NAME={q(sweep.exp_name(i))}; SETS=({' '.join('-S ' + q(s) for s in sets)}) ;;"
             for i, sets in enumerate(sweep.experiments)]
    head = ["#!/bin/bash",
            f"# cifarlab sweep {sweep.name}: {len(sweep.experiments)} experiments of commit {sweep.baseline[:7]}, "
            "one array task each.",
            "# Written by `python -m cifarlab sweep submit`; `python -m cifarlab sweep resubmit` submits it again.",
            *slurm.header(sweep.options, sweep.name, len(sweep.experiments), Path(sweep.folder) / "logs"),
            "set -u", "",
            f"SWEEP={q(sweep.name)}",
            f"GIT_REMOTE={q(sweep.git_remote)}   # cloned from, pushed to",
            f"BASELINE={sweep.baseline}",
            f"WORK={q(sweep.work)}   # a clone per experiment, kept between attempts",
            f"OUTCOMES={q(str(sweep.outcomes))}   # each experiment's last outcome, one line",
            f"LEAD={sweep.options.signal_lead}",
            f'INDEX="${{{slurm.INDEX}:?not an array task}}" JOB="${{{slurm.JOB_ID}:-?}}_$INDEX" CPUS="${{{slurm.CPUS}:-1}}"',
            'case "$INDEX" in', *cases,
            '    *) echo "no experiment for array index $INDEX" >&2; exit 2 ;;', "esac"]
    return "\n".join(head) + JOB_STEPS.replace("SETUP_LINES", f"{{ {sweep.setup.strip() or ':'}\n}} || exit 1")


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise CifarlabError(f"`{' '.join(cmd)}` failed: {one_line(result.stderr or result.stdout)}")
    return result


def git_remote_url(remote: str) -> str:
    """A git remote's name -> its URL; a URL is kept, a local path made absolute."""
    found = run(["git", "remote", "get-url", remote], check=False)
    url = found.stdout.strip() if found.returncode == 0 else remote
    return str(Path(url).resolve()) if "://" not in url and ":" not in url.split("/")[0] else url


def check_baseline(remote: str, url: str) -> str:
    """HEAD, if committed, clean and on the git remote: what every job clones."""
    baseline = run(["git", "rev-parse", "HEAD"]).stdout.strip()
    dirty = [line[3:] for line in run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.splitlines()]
    if dirty:
        raise CifarlabError(f"uncommitted changes ({', '.join(dirty)}); the jobs run the commit: commit and push first")
    tips = [line.split()[0] for line in run(["git", "ls-remote", "--heads", "--tags", url]).stdout.splitlines()]
    if not any(run(["git", "merge-base", "--is-ancestor", baseline, tip], check=False).returncode == 0 for tip in tips):
        raise CifarlabError(f"commit {baseline[:7]} is not on the git remote {remote} ({url}), which every job clones; "
                            f"push it first (git push {remote} HEAD), or fetch it (git fetch {remote}) if it is there")
    return baseline


def check_dvc_remote(config: Path = Path(".dvc", "config")) -> None:
    """The project's default DVC remote (committed, so every clone has it), at a path every clone resolves alike."""
    from configobj import ConfigObj   # what DVC reads its config with; DVC itself would resolve a relative path

    raw = ConfigObj(str(config)) if config.is_file() else {}
    name = raw.get("core", {}).get("remote")
    if not name:
        raise CifarlabError(f"no default DVC remote in {config}: the jobs share data and the run-cache through it; "
                            "add one with `dvc remote add -d NAME URL`, then commit and push")
    url = raw.get(f'remote "{name}"', {}).get("url", "")
    if "://" not in url and not Path(url).is_absolute():
        raise CifarlabError(f"DVC remote {name} is the relative path {url!r}, which each clone would resolve inside "
                            f"itself; use an absolute path (dvc remote modify {name} url /abs/path) or a URL")


def check_sets(sets: Sequence[str]) -> None:
    """The params.yaml sets checked now, as each job's `dvc exp run` would compose them (hours later)."""
    from cifarlab.config.overrides import check

    if Path("conf", "config.yaml").is_file():
        check([s for s in sets if ":" not in s.split("=")[0]])


def sweep_folder(name: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise CifarlabError(f"sweep name {name!r}; allowed: letters, digits, '_', '.', '-' (it names the experiments)")
    return (SWEEPS / name).resolve()


def load(name: str) -> Sweep:
    path = sweep_folder(name) / "sweep.json"
    if not path.is_file():
        raise CifarlabError(f"no sweep {name!r} here ({path} is missing); run from the repository root, or submit it "
                            "with `python -m cifarlab sweep submit`")
    raw = json.loads(path.read_text())
    return Sweep(**{**raw, "options": slurm.Options(**raw["options"])})


def save(sweep: Sweep) -> None:
    write_text(Path(sweep.folder) / "sweep.json", json.dumps(asdict(sweep), indent=2) + "\n")


def submit_jobs(sweep: Sweep, indices: Optional[list[int]] = None) -> str:
    submitted = time.time()
    job = slurm.submit(sweep.script, indices)
    every = list(range(len(sweep.experiments)))
    sweep.jobs.append({"id": job, "indices": every if indices is None else indices, "submitted": submitted})
    save(sweep)
    return job


def remote_experiments(sweep: Sweep) -> set[str]:
    prefix = f"refs/exps/{sweep.baseline[:2]}/{sweep.baseline[2:]}/"
    refs = [line.split()[-1] for line in run(["git", "ls-remote", sweep.git_remote, prefix + "*"]).stdout.splitlines()]
    return {ref[len(prefix):] for ref in refs if ref.startswith(prefix)}


def latest(sweep: Sweep) -> dict[int, dict]:
    """index -> its latest attempt: job, SLURM state ('-' where unknown), outcome, whether the job ended."""
    found = {}
    for job in sweep.jobs:                  # oldest first: a resubmission's attempt replaces the earlier one
        states = slurm.job_states(job["id"])
        for index in job["indices"]:
            outcome = sweep.outcomes / sweep.exp_name(index)
            fresh = outcome.is_file() and outcome.stat().st_mtime >= job["submitted"] - 1
            state = states.get(index, "-")
            found[index] = {"job": f"{job['id']}_{index}", "state": state,
                            "outcome": outcome.read_text().strip() if fresh else "-",
                            "ended": state not in slurm.ACTIVE and (state != "-" or fresh)}
    return found


def status_table(sweep: Sweep) -> tuple[str, list[int], dict[int, dict]]:
    """The status table, the indices not on the git remote, and each index's latest attempt."""
    pushed, attempts = remote_experiments(sweep), latest(sweep)
    rows = [("experiment", "sets", "job", "SLURM state", "on git remote", "outcome (log)")]
    for i, sets in enumerate(sweep.experiments):
        a = attempts.get(i, {"job": "-", "state": "-", "outcome": "-"})
        rows.append((sweep.exp_name(i), " ".join(sets), a["job"], a["state"],
                     "yes" if sweep.exp_name(i) in pushed else "no", f"{a['outcome']} ({sweep.folder}/logs/{i}.log)"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows)
    return text, [i for i in range(len(sweep.experiments)) if sweep.exp_name(i) not in pushed], attempts


def wait(sweep: Sweep, poll: float, timeout: Optional[float]) -> None:
    """Until every experiment's latest job has ended (the scheduler says so, or it wrote its outcome)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not all(attempt["ended"] for attempt in latest(sweep).values()):
        if deadline is not None and time.monotonic() > deadline:
            raise CifarlabError(f"sweep {sweep.name}: jobs still pending or running after {timeout:.0f} s; "
                                f"see `python -m cifarlab sweep status {sweep.name}`")
        time.sleep(poll)


def pull(sweep: Sweep) -> list[str]:
    """`dvc exp pull` (git refs and DVC cache) of the sweep's experiments on the git remote; their names."""
    names = sorted(remote_experiments(sweep) & {sweep.exp_name(i) for i in range(len(sweep.experiments))})
    if names:
        run(["dvc", "exp", "pull", sweep.git_remote, *names])
    return names


def submit(args: argparse.Namespace) -> int:
    folder = sweep_folder(args.name)
    options = slurm.Options.of(args)
    if (folder / "sweep.json").exists() and not args.dry_run:
        raise CifarlabError(f"sweep {args.name!r} exists ({folder}): `python -m cifarlab sweep resubmit {args.name}` "
                            "submits its unfinished experiments again; or choose another name")
    url = git_remote_url(args.git_remote)
    baseline = check_baseline(args.git_remote, url)
    check_dvc_remote()
    check_sets(args.set_param)
    venv = Path(sys.prefix) / "bin" / "activate"
    setup = args.setup if args.setup is not None else (f"source {shlex.quote(str(venv))}" if venv.is_file() else "")
    sweep = Sweep(name=args.name, baseline=baseline, git_remote=url, folder=str(folder), setup=setup,
                  work=str(Path(args.work).resolve() if args.work else folder / "work"),
                  experiments=expand(args.set_param), options=options)
    script = job_script(sweep)
    if args.dry_run:
        print(script)
        return 0
    write_text(sweep.script, script)
    (folder / "logs").mkdir(exist_ok=True)   # sbatch opens each task's log there; a missing folder fails it unlogged
    job = submit_jobs(sweep)
    print(f"sweep {args.name}: job {job}, {len(sweep.experiments)} experiments of commit {baseline[:7]}; "
          f"logs in {folder / 'logs'}\nnext: python -m cifarlab sweep status {args.name}, then "
          f"python -m cifarlab sweep collect {args.name}")
    return 0


def follow_up(args: argparse.Namespace) -> int:
    """status, resubmit and collect."""
    sweep = load(args.name)
    if args.command == "collect":
        wait(sweep, args.poll, args.timeout)
    text, missing, attempts = status_table(sweep)
    print(text)
    if args.command == "resubmit":
        again = [i for i in missing if attempts.get(i, {}).get("ended", True)]
        print(f"resubmitted {len(again)} experiments as job {submit_jobs(sweep, again)}" if again else
              "nothing to resubmit: each experiment is on the git remote, or its job is still pending or running")
    if args.command != "collect":
        return 0
    names = pull(sweep)
    print(f"\npulled {len(names)} of {len(sweep.experiments)} experiments: {' '.join(names) or '-'}")
    head = run(["git", "rev-parse", "HEAD"]).stdout.strip()
    if names and head == sweep.baseline:
        from cifarlab.tools.compare import main as compare

        if compare(args.by or []) != 0:
            return 1
    elif names:
        print(f"compare reads the experiments of HEAD, which is not the sweep's baseline {sweep.baseline[:7]}: "
              f"git checkout {sweep.baseline[:7]}, then python -m cifarlab compare")
    if len(names) < len(sweep.experiments):
        print(f"error: {len(sweep.experiments) - len(names)} experiments are not on the git remote: see their logs, "
              f"then `python -m cifarlab sweep resubmit {sweep.name}`", file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifarlab sweep", description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    s = commands.add_parser("submit", help="submit the sweep as one SLURM array job, one task per experiment")
    s.add_argument("name", help="the sweep's name; its experiments are NAME-1, NAME-2, ...")
    s.add_argument("-S", "--set-param", action="append", default=[], metavar="SET",
                   help="a DVC -S set, sweeps allowed ('train.seed=range(1,4)', 'preset=a,b'); repeatable")
    slurm.add_arguments(s)
    s.add_argument("--git-remote", default="origin",
                   help="the git remote (name or URL) the jobs clone and push to (default: %(default)s)")
    s.add_argument("--work", help="where the jobs' clones go, seen by every node (default: .cache/sweeps/NAME/work)")
    s.add_argument("--setup", help="shell lines that give a job python and dvc (default: activate this venv)")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit and write nothing")
    for command, what in (("status", "each experiment's SLURM state, whether it is on the git remote, its outcome"),
                          ("collect", "wait for the jobs, `dvc exp pull` the pushed experiments, compare them"),
                          ("resubmit", "submit again the experiments not on the git remote whose jobs ended")):
        c = commands.add_parser(command, help=what)
        c.add_argument("name")
        if command == "collect":
            c.add_argument("--by", action="append", metavar="PARAM",
                           help="a param to group by, as `compare` takes it; repeatable (default: compare's)")
            c.add_argument("--poll", type=float, default=30, help="seconds between SLURM queries (default: %(default)s)")
            c.add_argument("--timeout", type=float, help="stop waiting after this many seconds")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return submit(args) if args.command == "submit" else follow_up(args)
    except CifarlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
