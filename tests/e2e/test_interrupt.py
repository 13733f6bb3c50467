"""End to end: killing or interrupting `dvc repro` mid-training leaves no process behind, and the
rerun resumes to exactly the uninterrupted result; a failing stage's line says how to restore outputs.

Each process count runs the real pipeline in a temporary git + DVC repo (`make_repo`), then sends
each signal in turn to the process group of `dvc repro -f -s train` once one more epoch is saved, and
after each looks in /proc for any process whose working directory or command line is in the repo.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, forked_stages, make_repo, merge, run, tool_env, wait_until_none_left, write_params

pytestmark = [pytest.mark.e2e, pytest.mark.real_stage_processes]   # signals process groups, reads /proc

# Five epochs of four batches: room for three interruptions, each 0.3 s into the epoch after a saved
# one, and an epoch to spare before the last run finishes; short enough that the trainings stay cheap.
RUN = merge(TINY, {"data": {"synthetic_train_size": 256},
                   "model": {"name": "a7_net", "dropout": 0.05}, "optim": {"name": "sgd", "momentum": 0.9},
                   "train": {"epochs": 5, "batch_size": 64, "max_lr": 0.05, "max_at_epoch": 1},
                   "runtime": {"deterministic": True, "precision": "fp32"}})
SECONDS_UNTIL_NOTHING_IS_LEFT = 10.0   # Ctrl-C of a 2-process run: about 2 s idle, over 5 s beside another busy test worker


def declared_outputs_of(work: Path, stage: str) -> list[str]:
    from cifarlab import dvcfile

    return dvcfile.paths(yaml.safe_load((work / "dvc.yaml").read_text())["stages"][stage], *dvcfile.OUT_KINDS)


def final(repo: Path) -> tuple[dict, dict]:
    weights = torch.load(repo / "models/model.pt", weights_only=False)["state_dict"]
    return json.loads((repo / "metrics/train/metrics.json").read_text()), weights


def saved_epoch(repo: Path) -> int:
    files = sorted((repo / ".cache/train").glob("*.pt"))
    try:
        return torch.load(files[0], weights_only=False)["epoch"] if files else 0
    except Exception:                      # being replaced right now
        return 0


@pytest.fixture(scope="module", params=[1, 2], ids=["1-process", "2-process-ddp"])
def repo(request, tmp_path_factory):
    """A committed tiny pipeline run once, uninterrupted: (repo, its final metrics and weights)."""
    work = make_repo(tmp_path_factory.mktemp(f"kill{request.param}"), merge(RUN, {"runtime": {"nproc": request.param}}))
    with forked_stages():                                            # a reference, never signalled
        first = run(["dvc", "repro", "train"], work)
    assert "no saved state, starting fresh" in first.stdout
    assert not list((work / ".cache/train").glob("*.pt"))          # a completed run leaves no state
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "reference run"], work)
    return work, request.param, final(work)


# Each signal in turn, each into a later epoch of the same training: a run is interrupted, the next
# `dvc repro -f` resumes it and is interrupted in turn, and the last one finishes. Under 2 processes
# SIGTERM ends DVC at once, so the stage dies with it as under SIGKILL (PR_SET_PDEATHSIG): the SIGKILL
# case covers it there; the 1-process case covers the stage's own SIGTERM handling.
SIGNALS = {1: (signal.SIGINT, signal.SIGTERM, signal.SIGKILL), 2: (signal.SIGINT, signal.SIGKILL)}


def interrupt_once(work: Path, nproc: int, signum: signal.Signals) -> tuple[str, int]:
    """`dvc repro -f -s train`, its process group sent `signum` 0.3 s into the epoch after the one
    saved when it started: (its output, the epoch saved when nothing was left)."""
    before = saved_epoch(work)
    dvc = subprocess.Popen(["dvc", "repro", "-f", "-s", "train"], cwd=work, env=tool_env(), start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while saved_epoch(work) <= before and dvc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert dvc.poll() is None, dvc.communicate()[0]
    time.sleep(0.3)                                                  # into the next epoch
    os.killpg(dvc.pid, signum)
    left, seconds = wait_until_none_left(work, timeout=60)
    output = dvc.communicate(timeout=60)[0]
    print(f"{nproc} process(es), {signum.name} after epoch {before + 1}: nothing left after {seconds:.2f} s")
    assert left == [] and seconds < SECONDS_UNTIL_NOTHING_IS_LEFT, (signum.name, left)
    assert "Traceback" not in output and "ChildFailedError" not in output, output
    # SIGTERM of the group ends DVC at once, and the trainer dies with it (no one is left to read a
    # message); Ctrl-C leaves DVC waiting for the stage, whose one line says what happened.
    if signum == signal.SIGINT:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output
        assert "interrupted" in errors[0] and "rerun to resume" in errors[0], output
        assert "`dvc checkout train` restores" in errors[0] and "models/model.pt" in errors[0]
    epoch = saved_epoch(work)
    assert epoch > before, (signum.name, before, epoch)
    return output, epoch


def test_killing_dvc_repro_leaves_nothing_and_the_rerun_resumes(repo):
    """SIGINT, SIGTERM and SIGKILL of `dvc repro`'s process group, one after another into later epochs:
    each time nothing is left, and the next run resumes from the last complete epoch; the last one
    ends with exactly the uninterrupted run's metrics and weights."""
    work, nproc, (reference_metrics, reference_weights) = repo
    epoch = 0
    for signum in SIGNALS[nproc]:
        output, saved = interrupt_once(work, nproc, signum)
        expected = "no saved state, starting fresh" if epoch == 0 else f"resuming from the end of epoch {epoch}"
        assert expected in output, (signum.name, output)   # after a completed run, -f starts over
        assert epoch or "resuming" not in output, output
        epoch = saved
    assert epoch < RUN["train"]["epochs"], "every epoch ran before the last signal: the chain proves nothing"

    rerun = run(["dvc", "repro", "-f", "-s", "train"], work)          # after an interruption, -f resumes
    assert f"resuming from the end of epoch {epoch}" in rerun.stdout
    metrics, weights = final(work)
    assert metrics == reference_metrics
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[name], reference_weights[name]) for name in weights)
    tsv = (work / "metrics/train/plots/metrics/test/accuracy.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in tsv[1:]] == list(range(1, RUN["train"]["epochs"] + 1))   # none twice or missing
    assert not list((work / ".cache/train").glob("*.pt"))


def test_a_train_failure_is_one_line_once_and_says_how_to_restore(repo):
    work, nproc, _ = repo
    params = yaml.safe_load((work / "params.yaml").read_text())
    write_params(work, merge(params, {"train": {"batch_size": 63} if nproc == 2 else {"max_at_epoch": 99}}))
    try:
        result = run(["dvc", "repro", "-s", "train"], work, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output
        assert "train." in errors[0] and "Traceback" not in output and "ChildFailedError" not in output
        hint = "; DVC removed the stage's previous outputs before running it: `dvc checkout train` restores "
        assert hint in errors[0] and "models/model.pt" in errors[0].split(hint)[1]   # the line ends with it
        commands = re.findall(r"`([^`]+)` restores", errors[0])
        assert commands[0] == "dvc checkout train" and commands[1].startswith("git checkout -- "), errors[0]
        outputs = [work / path for path in declared_outputs_of(work, "train")]
        assert not [path for path in outputs if path.exists()]      # DVC deleted every output before running train ...
        run(["git", "checkout", "--", "params.yaml"], work)
        for command in commands:                                     # ... and the printed commands bring them back
            run(command.split(), work)
        assert [path for path in outputs if not path.exists()] == []
    finally:
        run(["git", "checkout", "--", "params.yaml"], work)
