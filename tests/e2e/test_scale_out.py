"""End to end: shared storage through a DVC remote (parallel experiments through DVC's queue are in
test_experiments.py, on its seeds)."""

from __future__ import annotations

import pytest

from conftest import copy_repo, ran_stages, run

pytestmark = pytest.mark.e2e


@pytest.fixture
def baseline(tiny_repo, tmp_path):
    """A tiny repo whose pipeline has run once and is committed (dvc.lock + DVC cache): a copy of
    conftest.tiny_repo."""
    return copy_repo(tiny_repo[0], tmp_path / "repo")


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
