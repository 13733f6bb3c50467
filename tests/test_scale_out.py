"""End to end: parallel experiments through DVC's queue, and shared storage through a DVC remote."""

from __future__ import annotations

import json
import time

import pytest

from conftest import TINY_RUN, exp_rows, make_repo, ran_stages, run, wait_for_queue

pytestmark = pytest.mark.e2e

# The plumbing, not the learning: as small as every stage allows (lr_find: the tiny configuration's).
QUEUED_LRS = (0.001, 0.01)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A tiny repo whose pipeline has run once and is committed (dvc.lock + DVC cache)."""
    work = make_repo(tmp_path_factory.mktemp("scale"), TINY_RUN)
    run(["dvc", "repro"], work)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "baseline run"], work)
    return work


def test_queued_experiments_run_in_parallel_and_show_up(baseline, monkeypatch):
    work = baseline
    # Two experiments at once on a 2-core machine: one compute thread each (the workers inherit it).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for lr in QUEUED_LRS:
        run(["dvc", "exp", "run", "--queue", "-n", f"lr-{lr}", "-S", f"train.max_lr={lr}"], work)
    started = time.monotonic()
    run(["dvc", "queue", "start", "--jobs", "2"], work)
    try:
        tasks = wait_for_queue(work, timeout=600)
    finally:
        run(["dvc", "queue", "stop"], work, check=False)
    print(f"queue of {len(QUEUED_LRS)} experiments, 2 jobs: {time.monotonic() - started:.1f} s")
    failed = [row for row in tasks if row[-1] != "Success"]
    logs = {row[0]: run(["dvc", "queue", "logs", row[0]], work, check=False).stdout for row in tasks}
    assert failed == [], "\n".join(logs[row[0]][-3000:] for row in failed)

    for log in logs.values():
        # The data came from the DVC cache (dvc.lock pins it): the queued copies did not re-download.
        assert "Stage 'download' didn't change, skipping" in log
        assert {"train", "evaluate", "report"} <= ran_stages(log)

    rows = exp_rows(json.loads(run(["dvc", "exp", "show", "--json"], work).stdout))
    for lr in QUEUED_LRS:
        data = rows[f"lr-{lr}"]
        assert data["params"]["params.yaml"]["data"]["train"]["max_lr"] == lr
        assert 0.0 <= data["metrics"]["metrics/test.json"]["data"]["accuracy"] <= 1.0
        training = data["metrics"]["metrics/training.json"]["data"]
        assert training["images_per_second"] > 0 and training["max_lr"] == lr


def test_remote_push_then_a_fresh_clone_pulls_and_has_nothing_to_run(baseline, tmp_path):
    work = baseline
    storage = tmp_path / "storage"
    run(["dvc", "remote", "add", "--default", "shared", str(storage)], work)
    run(["git", "commit", "-qam", "shared storage"], work)
    run(["dvc", "push"], work)
    assert any(p.is_file() for p in storage.rglob("*"))

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(work), str(clone)], tmp_path)
    assert not (clone / "models" / "model.pt").exists()
    run(["dvc", "pull"], clone)
    assert (clone / "models" / "model.pt").read_bytes() == (work / "models" / "model.pt").read_bytes()
    assert (clone / "data").is_dir()
    result = run(["dvc", "repro"], clone)
    assert ran_stages(result.stdout) == set(), result.stdout
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone).stdout
