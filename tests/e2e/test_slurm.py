"""End to end: a sweep on a real SLURM (slurmctld + slurmd + munge on 127.0.0.1, started here), each
experiment an array task that clones a shared git remote, runs `dvc exp run` and pushes; then
`python -m cifarlab sweep collect` pulls them and compares. Skipped where SLURM is not installed
(Debian: `apt-get install slurm-wlm munge`) or this user cannot start slurmd (root only)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifarlab.engine.distributed import free_port

from conftest import TINY_NET, TINY_RUN, exp_rows, make_repo, merge, run, tool_env

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.real_stage_processes]   # jobs run on slurmd

# The tiny run without the mistakes gallery and its Grad-CAM, evaluate's slowest part: one per seed runs here.
NO_GALLERIES = {"evaluate": {"gallery_size": 0, "gradcam_size": 0}}
# One array task per seed, one round of them on the test's 2-CPU node: compare gets a group of two.
SEEDS = (1, 2)
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")

SLURM_CONF = """\
ClusterName=cifarlab
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=10
NodeName=node1 NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=node1 Default=YES MaxTime=INFINITE State=UP
"""



def stop_daemons(pid_files: list[Path]) -> None:
    """End the daemons whose pids the files hold (those this fixture started): SIGTERM to each, a few
    seconds for them all to exit, then SIGKILL for any left."""
    pids = []
    for path in pid_files:
        try:
            pid = int(path.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (OSError, ValueError, IndexError):
            pass
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.1)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def daemon_logs(root: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-1500:]}" for log in [*root.glob("*.log"), root / "munge" / "log"]
                     if log.is_file())


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster (2 CPUs, no accounting: states come from squeue) with its own munge,
    config, state, ports and logs in a temporary folder; the environment to reach it (SLURM_CONF)."""
    missing = [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("slurmd runs jobs as their users, so it must start as root; this test runs as another user")
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("munge", "state", "spool"):
        (root / folder).mkdir(mode=0o700)
    (root / "munge" / "key").write_bytes(os.urandom(1024))
    (root / "munge" / "key").chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=free_port(), slurmd_port=free_port()))
    env = {**tool_env(), "SLURM_CONF": str(conf), "PATH": f"{tool_env()['PATH']}{os.pathsep}/usr/sbin"}
    munge = root / "munge"
    started = []
    try:
        for cmd, pid_file in (
                (["munged", "--force", f"--socket={munge}/socket", f"--key-file={munge}/key",
                  f"--pid-file={munge}/pid", f"--log-file={munge}/log", f"--seed-file={munge}/seed"], munge / "pid"),
                (["slurmctld", "-i"], root / "slurmctld.pid"),
                (["slurmd", "-N", "node1"], root / "slurmd.pid")):
            daemon = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
            if daemon.returncode != 0:
                raise AssertionError(f"{cmd[0]} did not start: {daemon.stderr}\n{daemon_logs(root)}")
            started.append(pid_file)
        deadline = time.monotonic() + 30
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
            if time.monotonic() > deadline:
                raise AssertionError(f"the SLURM node did not come up in 30 s:\n{daemon_logs(root)}")
            time.sleep(0.2)
        yield env
    finally:
        subprocess.run(["scancel", "--user=root", "--partition=debug"], env=env, capture_output=True)
        stop_daemons(started)


def sweep(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifarlab", "sweep", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_a_sweep_runs_as_array_jobs_and_dvc_exp_pull_brings_every_experiment_back(slurm, tmp_path):
    work = make_repo(tmp_path, merge(merge(TINY_RUN, TINY_NET), NO_GALLERIES))
    run(["git", "init", "-q", "--bare", str(tmp_path / "remote.git")], tmp_path)
    run(["git", "remote", "add", "origin", str(tmp_path / "remote.git")], work)
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "storage")], work)
    run(["git", "commit", "-qam", "shared git and DVC remotes"], work)
    run(["git", "push", "-q", "origin", "HEAD:main"], work)

    started = time.perf_counter()
    submitted = sweep(["submit", "seeds", "-S", f"train.seed=range({SEEDS[0]},{SEEDS[-1] + 1})", "--gres", "none", "--cpus-per-task", "1",
                       "--time", "10:00"], work, slurm)
    assert submitted.returncode == 0, submitted.stderr
    collected = sweep(["collect", "seeds", "--poll", "1", "--timeout", "600"], work, slurm)
    seconds = time.perf_counter() - started
    queue = subprocess.run(["squeue", "-h", "-r", "--states=all", "-o", "%i %j %T %M %R"], env=slurm,
                           capture_output=True, text=True).stdout
    print(f"{submitted.stdout}\n{collected.stdout}{collected.stderr}\nsqueue:\n{queue}\nsweep: {seconds:.0f} s")
    logs = work / ".cache" / "sweeps" / "seeds" / "logs"
    assert collected.returncode == 0, collected.stdout + collected.stderr + "".join(
        f"\n--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(logs.glob("*.log")))

    names = [f"seeds-{i}" for i in SEEDS]
    status = collected.stdout.splitlines()
    for i, name in enumerate(names):
        row = next(line for line in status if line.startswith(name + " "))
        assert f"train.seed={SEEDS[i]}" in row and "COMPLETED" in row and " yes " in row, row
        assert f"pushed: {name} is on the git remote" in row
        assert "Pushed experiment" in (logs / f"{i}.log").read_text()
    assert f"pulled {len(SEEDS)} of {len(SEEDS)} experiments: {' '.join(names)}" in collected.stdout
    compared = next(line for line in status if all(name in line for name in names))   # compare: one group of them
    assert f" {len(SEEDS)} " in compared, compared

    rows = exp_rows(json.loads(run(["dvc", "exp", "show", "--json"], work).stdout))
    for i, name in enumerate(names):
        assert rows[name]["params"]["params.yaml"]["data"]["train"]["seed"] == SEEDS[i]
        assert 0.0 <= rows[name]["metrics"]["metrics/test.json"]["data"]["accuracy"] <= 1.0
    assert any((tmp_path / "storage" / "runs").rglob("*")), "the run-cache is not on the DVC remote"
    run(["dvc", "exp", "apply", "seeds-2"], work)      # the pulled DVC cache holds each experiment's outputs
    assert (work / "models" / "model.pt").stat().st_size > 0

    again = sweep(["resubmit", "seeds"], work, slurm)
    assert "nothing to resubmit" in again.stdout, again.stdout + again.stderr
