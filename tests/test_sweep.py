"""Sweeps as SLURM array jobs (`cifarlab.tools.sweep`, `cifarlab.tools.slurm`) without SLURM: the
expansion of `-S` sets, the `#SBATCH` lines, the states read back, the checks before submitting, and
the job script itself, run by bash with a stand-in `dvc`: its success, its failure, and its trap
on cancellation and on the time-limit warning (nothing pushed, the reason in its log).
The real cluster is in tests/e2e/test_slurm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from cifarlab.errors import CifarlabError
from cifarlab.tools import slurm, sweep

FAKE_DVC = r"""#!/bin/bash
# A stand-in for dvc: notes each call; `exp run` sleeps or fails as told; `exp push` pushes the ref as DVC does.
echo "dvc $*" >> "$FAKE_DVC_CALLS"
case "$1 $2" in
    "exp run") [ -z "${FAKE_RUN_SLEEP:-}" ] || exec sleep "$FAKE_RUN_SLEEP"; exit "${FAKE_RUN_EXIT:-0}" ;;
    "exp push") base=$(git rev-parse HEAD); ref="refs/exps/${base:0:2}/${base:2}/${@: -1}"
                git update-ref "$ref" HEAD && git push -q origin "$ref:$ref" ;;
esac
"""


def options(**changes) -> slurm.Options:
    return slurm.Options(**changes)


def a_sweep(tmp_path: Path, experiments=(["train.seed=1"],), **changes) -> sweep.Sweep:
    folder = tmp_path / ".cache" / "sweeps" / "s"
    fields = dict(name="s", baseline="ab" + "0" * 38, git_remote=str(tmp_path / "remote.git"), folder=str(folder),
                  work=str(folder / "work"), setup="", experiments=[list(e) for e in experiments])
    return sweep.Sweep(**{**fields, **changes})


def git(*args, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


# --- what a sweep is -----------------------------------------------------------------------------

def test_sets_expand_as_dvc_queue_expands_them():
    assert sweep.expand(["preset=assignment7,assignment10", "train.seed=range(1,3)"]) == [
        ["preset=assignment7", "train.seed=1"], ["preset=assignment7", "train.seed=2"],
        ["preset=assignment10", "train.seed=1"], ["preset=assignment10", "train.seed=2"]]
    assert sweep.expand(["train.max_lr=0.01"]) == [["train.max_lr=0.01"]]
    assert sweep.expand(["other.yaml:a=1,2"]) == [["other.yaml:a=1"], ["other.yaml:a=2"]]
    with pytest.raises(CifarlabError, match=r"^-S train.seed=\(: .*parsing") as err:
        sweep.expand(["train.seed=("])
    assert "\n" not in str(err.value)


def test_sets_are_checked_before_anything_is_submitted(monkeypatch):
    monkeypatch.chdir(REPO)
    sweep.check_sets(["preset=assignment7,assignment10", "train.seed=range(1,3)"])
    with pytest.raises(CifarlabError, match="train.epochs"):
        sweep.check_sets(["train.seed=1,2", "train.epochs=0"])
    with pytest.raises(CifarlabError, match="did you mean `train.epochs`"):
        sweep.check_sets(["train.epoch=3"])


def test_options_become_sbatch_lines(tmp_path):
    default = slurm.header(options(), "seeds", 6, tmp_path)
    assert default == ["#SBATCH --job-name=cifarlab-seeds", "#SBATCH --array=0-5", f"#SBATCH --output={tmp_path}/%a.log",
                       "#SBATCH --open-mode=append", "#SBATCH --time=02:00:00", "#SBATCH --cpus-per-task=8",
                       "#SBATCH --gres=gpu:1", "#SBATCH --signal=B:USR1@120"]
    chosen = slurm.header(options(gres="none", partition="gpu-long", mem="32G", max_parallel=2, time="1-00:00:00",
                                  cpus_per_task=4, signal_lead=300, sbatch_args=["--account=lab", "--qos=high"]),
                          "s", 3, tmp_path)
    assert "#SBATCH --array=0-2%2" in chosen and not any("--gres" in line for line in chosen)
    assert chosen[-5:] == ["#SBATCH --partition=gpu-long", "#SBATCH --mem=32G", "#SBATCH --signal=B:USR1@300",
                           "#SBATCH --account=lab", "#SBATCH --qos=high"]


@pytest.mark.parametrize("limit, seconds", [("30", 1800), ("10:30", 630), ("02:00:00", 7200), ("1-0", 86400),
                                            ("1-2:30", 95400), ("2-01:00:05", 176405)])
def test_time_limits_read_as_slurm_reads_them(limit, seconds):
    assert slurm.seconds(limit) == seconds


def test_bad_options_are_one_line_errors():
    with pytest.raises(CifarlabError, match=r"--time '2h' is not a SLURM time limit; allowed: MINUTES"):
        options(time="2h").check()
    with pytest.raises(CifarlabError, match=r"--signal-lead 120 s; allowed: .* less than --time 2 \(120 s\)"):
        options(time="2").check()
    with pytest.raises(CifarlabError, match="at least 1"):
        options(max_parallel=0).check()


def test_array_task_states_from_sacct_and_squeue():
    sacct = "12_0|COMPLETED\n12_1|CANCELLED by 0\n12_2|TIMEOUT\n12_[3-5,7%2]|PENDING\n12.batch|COMPLETED\n"
    assert slurm.parse_states(sacct) == {0: "COMPLETED", 1: "CANCELLED", 2: "TIMEOUT", 3: "PENDING", 4: "PENDING",
                                         5: "PENDING", 7: "PENDING"}
    assert slurm.parse_states("40_2|RUNNING\n40_[0-1]|PENDING") == {0: "PENDING", 1: "PENDING", 2: "RUNNING"}
    assert slurm.parse_states("") == {}


def test_an_ended_job_is_known_by_its_state_or_its_fresh_outcome(tmp_path, monkeypatch):
    s = a_sweep(tmp_path, experiments=[["a=1"], ["a=2"], ["a=3"]])
    s.jobs = [{"id": "7", "indices": [0, 1, 2], "submitted": time.time() - 60}]
    monkeypatch.setattr(slurm, "job_states", lambda job: {0: "COMPLETED", 1: "RUNNING"})   # 2: aged out of squeue
    assert [a["ended"] for a in sweep.latest(s).values()] == [True, False, False]
    s.outcomes.mkdir(parents=True)
    (s.outcomes / "s-3").write_text("pushed: s-3 is on the git remote\n")
    assert sweep.latest(s)[2] == {"job": "7_2", "state": "-", "outcome": "pushed: s-3 is on the git remote",
                                  "ended": True}
    s.jobs.append({"id": "9", "indices": [2], "submitted": time.time() + 5})   # resubmitted: that outcome is older
    assert sweep.latest(s)[2]["outcome"] == "-" and not sweep.latest(s)[2]["ended"]


# --- the checks before submitting ----------------------------------------------------------------

@pytest.fixture
def small_repo(tmp_path):
    """A git + DVC repo (no pipeline) with a bare git remote holding its commit and a default DVC remote."""
    work = tmp_path / "repo"
    work.mkdir()
    git("init", "-q", "--bare", str(tmp_path / "remote.git"), cwd=tmp_path)
    git("init", "-q", cwd=work)
    git("config", "user.email", "t@example.com", cwd=work)
    git("config", "user.name", "t", cwd=work)
    (work / ".dvc").mkdir()
    (work / ".dvc" / "config").write_text(f"[core]\n    remote = shared\n['remote \"shared\"']\n"
                                          f"    url = {tmp_path / 'storage'}\n")
    git("add", "-A", cwd=work)
    git("commit", "-qm", "base", cwd=work)
    git("remote", "add", "origin", str(tmp_path / "remote.git"), cwd=work)
    git("push", "-q", "origin", "HEAD:main", cwd=work)
    return work


def submit(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, "-m", "cifarlab", "sweep", "submit", "s", *args], cwd=work, env=env,
                          capture_output=True, text=True)


def test_dry_run_prints_the_script_and_submits_nothing(small_repo):
    result = submit(small_repo, "-S", "train.seed=1,2", "--partition", "gpu", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#!/bin/bash\n# cifarlab sweep s: 2 experiments of commit")
    for line in ("#SBATCH --array=0-1", "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu",
                 f"GIT_REMOTE={small_repo.parent / 'remote.git'}   # cloned from, pushed to", "    0) NAME=s-1; SETS=(-S train.seed=1) ;;",
                 "    1) NAME=s-2; SETS=(-S train.seed=2) ;;", f"{{ source {Path(sys.prefix) / 'bin' / 'activate'}"):
        assert line in result.stdout.splitlines(), line
    assert not (small_repo / ".cache").exists()


def test_what_a_job_could_not_use_is_refused_before_submitting(small_repo):
    (small_repo / "new.txt").write_text("x")
    git("add", "new.txt", cwd=small_repo)
    assert "error: uncommitted changes (new.txt); the jobs run the commit" in submit(small_repo, "--dry-run").stderr
    git("commit", "-qm", "not pushed", cwd=small_repo)
    refused = submit(small_repo, "--dry-run").stderr
    assert "is not on the git remote origin" in refused and "git push origin HEAD" in refused
    git("push", "-q", "origin", "HEAD:main", cwd=small_repo)
    (small_repo / ".dvc" / "config").write_text("[core]\n    remote = shared\n['remote \"shared\"']\n    url = ../storage\n")
    git("commit", "-qam", "relative remote", cwd=small_repo)
    git("push", "-q", "origin", "HEAD:main", cwd=small_repo)
    assert "DVC remote shared is the relative path '../storage'" in submit(small_repo, "--dry-run").stderr
    (small_repo / ".dvc" / "config").write_text("")
    git("commit", "-qam", "no remote", cwd=small_repo)
    git("push", "-q", "origin", "HEAD:main", cwd=small_repo)
    assert "no default DVC remote in .dvc/config" in submit(small_repo, "--dry-run").stderr
    assert "--time '2h' is not a SLURM time limit" in submit(small_repo, "--time", "2h").stderr


# --- the job script, run by bash with a stand-in dvc ---------------------------------------------

@pytest.fixture
def job(tmp_path, small_repo):
    """Run the sweep's job script for index 0 as SLURM would, with FAKE_DVC first on PATH: start(**env)
    -> the running process; the sweep, its log and the file of dvc calls are attributes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text(FAKE_DVC)
    (bin_dir / "dvc").chmod(0o755)
    baseline = git("rev-parse", "HEAD", cwd=small_repo).strip()
    s = a_sweep(tmp_path, experiments=[["train.seed=1", "report.note=two words"]], baseline=baseline,
                options=slurm.Options(signal_lead=60))
    s.script.parent.mkdir(parents=True)
    s.script.write_text(sweep.job_script(s))

    class Job:
        sweep, log, calls = s, tmp_path / "job.log", tmp_path / "dvc-calls"

        @staticmethod
        def start(**env) -> subprocess.Popen:
            environ = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_DVC_CALLS": str(Job.calls),
                       "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "41", **env}
            with Job.log.open("a") as log:
                return subprocess.Popen(["bash", str(s.script)], stdout=log, stderr=subprocess.STDOUT, env=environ,
                                        start_new_session=True)

        @staticmethod
        def outcome() -> str:
            return (s.outcomes / "s-1").read_text().strip()

        @staticmethod
        def on_remote() -> str:
            return git("for-each-ref", "refs/exps", cwd=Path(s.git_remote))

    return Job


def test_the_script_is_valid_bash_and_quotes_each_set(job):
    assert subprocess.run(["bash", "-n", str(job.sweep.script)]).returncode == 0
    assert "    0) NAME=s-1; SETS=(-S train.seed=1 -S 'report.note=two words') ;;" in job.sweep.script.read_text()


def test_a_job_runs_pushes_data_then_the_ref_and_a_second_run_does_nothing(job):
    assert job.start().wait(timeout=60) == 0, job.log.read_text()
    calls = job.calls.read_text().splitlines()
    assert calls == ["dvc exp run --pull -n s-1 -S train.seed=1 -S report.note=two words", "dvc push --run-cache",
                     "dvc exp push --no-cache origin s-1"]
    assert f"refs/exps/{job.sweep.baseline[:2]}/{job.sweep.baseline[2:]}/s-1" in job.on_remote()
    assert job.outcome() == "pushed: s-1 is on the git remote"
    assert "job 41_0 (index 0)" in job.log.read_text()
    assert job.start().wait(timeout=60) == 0
    assert "s-1 is already on the git remote: nothing to do" in job.log.read_text()
    assert len(job.calls.read_text().splitlines()) == 3


def test_a_failed_run_pushes_nothing_and_says_why(job):
    assert job.start(FAKE_RUN_EXIT="3").wait(timeout=60) == 3
    assert job.outcome() == ("failed: exit status 3 during running the experiment; nothing of it is on the git "
                             "remote; resubmit to resume: python -m cifarlab sweep resubmit s")
    assert job.outcome() in job.log.read_text()
    assert job.on_remote() == ""
    assert job.calls.read_text().splitlines() == ["dvc exp run --pull -n s-1 -S train.seed=1 -S report.note=two words"]


@pytest.mark.parametrize("signum, why", [(signal.SIGTERM, "cancelled (SIGTERM: scancel, preemption or the time limit)"),
                                         (signal.SIGUSR1, "time limit in 60 s (SIGUSR1)")])
def test_a_cancelled_or_timed_out_job_stops_its_run_pushes_nothing_and_says_why(job, signum, why):
    sleep = f"120.{os.getpid()}"            # a run that would outlast the test, told apart from any other sleep
    process = job.start(FAKE_RUN_SLEEP=sleep)
    deadline = time.monotonic() + 30
    while not (job.calls.exists() and "exp run" in job.calls.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    started = time.monotonic()
    process.send_signal(signum)              # SLURM signals the batch shell (scancel: every process of the job)
    assert process.wait(timeout=30) != 0
    assert time.monotonic() - started < 10  # the run was stopped, not waited for
    assert job.outcome() == (f"failed: {why} during running the experiment; nothing of it is on the git remote; "
                             "resubmit to resume: python -m cifarlab sweep resubmit s")
    assert f"{why}: stopping (running the experiment)" in job.log.read_text()
    assert job.on_remote() == ""
    assert "push" not in job.calls.read_text()
    assert subprocess.run(["pgrep", "-f", f"sleep {sleep}"], capture_output=True).stdout == b""   # the run has ended
