"""`python -m cifarlab queue` (cifarlab.tools.queue) without a queue: the `-S` overrides that give back
a task's params.yaml, and which Running tasks it judges stuck (a stand-in for DVC's queue, real
processes). The real thing, a killed worker's task found, cleaned and queued again, is
tests/e2e/test_queue_recovery.py."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cifarlab.config.compose import compose_text
from cifarlab.tools import queue as tool
from conftest import REPO

CONF = REPO / "conf"
URL = "https://example.com/it's a \\ mirror\\"    # a quote, a lone backslash and one at the end


@pytest.mark.parametrize("overrides, expected", [
    (["train.div_factor=50"], ["train.div_factor=50"]),
    (["preset=assignment7", "budget=quick", "train.seed=3"], ["preset=assignment7", "budget=quick", "train.seed=3"]),
    (["preset=fast", "train.max_lr=1e-3", "lr_find.start_lr=1e-6", "evaluate.tta_translate=false",
      "data.url=" + tool.override_value(URL), "lr_find.rule=valley"],
     ["preset=fast", "data.url=" + tool.override_value(URL), "lr_find.start_lr=1e-06", "lr_find.rule=valley",
      "train.max_lr=0.001", "evaluate.tta_translate=false"]),
], ids=["one-key", "groups", "values-to-quote"])
def test_the_overrides_compose_the_task_params_back(overrides, expected):
    """The presets and budgets the params name, then each key that still differs, in the file's
    order: composed again, they give exactly the params the task was queued with."""
    text = compose_text(overrides, CONF)
    found = tool.overrides_for(text, CONF)
    assert found == expected
    assert yaml.safe_load(compose_text(found, CONF)) == yaml.safe_load(text)


def test_a_string_with_quotes_and_backslashes_comes_back_as_it_was():
    assert yaml.safe_load(compose_text(["data.url=" + tool.override_value(URL)], CONF))["data"]["url"] == URL


@pytest.mark.parametrize("value, shown", [
    ("find", "find"), ("true", "'true'"), ("1e-3", "'1e-3'"), ("", "''"), (True, "true"), (None, "null"),
    (0.004, "0.004"), (1e-05, "1e-05"), (3, "3"), ([1, "a b"], "[1,'a b']"),
])
def test_override_values_keep_their_type(value, shown):
    assert tool.override_value(value) == shown


def test_params_no_override_can_give_are_said_to_be_so():
    text = compose_text([], CONF) + "odd key: 1\n"          # Hydra's grammar has no key with a space
    assert tool.overrides_for(text, CONF) is None
    assert tool.overrides_for(compose_text([], CONF), REPO / "no-conf") is None


def test_the_requeue_command_names_the_task_and_quotes_for_the_shell():
    command = tool.requeue_command("lr-a", ["train.max_lr=0.01", "data.url='a b'"])
    assert command == ["dvc", "exp", "run", "--queue", "-n", "lr-a", "-S", "train.max_lr=0.01", "-S", "data.url='a b'"]
    assert tool.requeue_command(None, [])[-1] == "--queue"


# --- which Running tasks are stuck -------------------------------------------------------------------

def sleeper(*marker: str) -> subprocess.Popen:
    """A live process whose command line holds `marker`."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *marker])


def fake_repo(root: Path, tasks: dict, worker_reports=(), results=None) -> SimpleNamespace:
    """A stand-in for `dvc.repo.Repo` with the parts of its celery queue the tool uses. `tasks`:
    {stash rev: (the pid DVC recorded for its `exec-run`, or None; whether its copy exists)};
    `results`: {stash rev: the experiment ref its run recorded}. Its `calls` lists the kills and removals."""
    from dvc_task.proc.process import ProcessInfo

    wdir, run_dir = root / ".dvc/tmp/exps/celery", root / ".dvc/tmp/exps/run"
    wdir.mkdir(parents=True)
    procs, entries = {}, []
    for rev, (pid, has_copy) in tasks.items():
        copy = root / f".dvc/tmp/exps/tmp{rev[:6]}"
        if has_copy:
            copy.mkdir(parents=True)
            (copy / "params.yaml").write_text("train: {}\n")
        info = run_dir / rev / f"{rev}.run"
        info.parent.mkdir(parents=True)
        result = (results or {}).get(rev)
        info.write_text(json.dumps({"git_url": "", "baseline_rev": "0" * 40, "location": "dvc-task",
                                    "root_dir": str(copy), "dvc_dir": ".dvc", "status": 3 if result else 2,
                                    "result_hash": "1" * 40 if result else None, "result_ref": result}))
        if pid is not None:
            procs[rev] = ProcessInfo(pid=pid, stdin=None, stdout=None, stderr=None, returncode=None)
        entries.append(SimpleNamespace(stash_rev=rev, name=f"exp-{rev[:3]}", baseline_rev="0" * 40))
    calls = []
    queue = SimpleNamespace(
        wdir=str(wdir), iter_active=lambda: iter(entries), proc=procs,
        kill=lambda revs, force: calls.append(("kill", *revs)), remove=lambda revs: calls.append(("remove", *revs)),
        get_infofile_path=lambda rev: str(run_dir / rev / f"{rev}.run"),
        worker_status=lambda: {"dvc-exp-x-1@localhost": [{"id": "t", "kwargs": {"entry_dict": {"stash_rev": rev}}}
                                                          for rev in worker_reports]})
    return SimpleNamespace(root_dir=str(root), experiments=SimpleNamespace(celery_queue=queue), calls=calls)


def node_marker(repo: SimpleNamespace) -> str:
    return "dvc-exp-" + hashlib.sha256(repo.experiments.celery_queue.wdir.encode()).hexdigest()[:6] + "-1@localhost"


def test_a_task_is_stuck_when_its_process_is_gone_or_another_program(tmp_path):
    running, gone, reused = "a" * 40, "b" * 40, "c" * 40
    alive = sleeper("--infofile", running)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    try:
        repo = fake_repo(tmp_path, {running: (alive.pid, True), gone: (ended.pid, True), reused: (alive.pid, False)})
        stuck, leaked = tool.find_stuck(repo)
    finally:
        alive.kill()
    assert [(task.rev, task.pid, task.copy is not None) for task in stuck] == [(gone, ended.pid, True),
                                                                               (reused, alive.pid, False)]
    assert stuck[0].task == "task bbbbbbb (exp-bbb)" and stuck[0].copy == tmp_path / ".dvc/tmp/exps/tmpbbbbbb"
    assert stuck[0].requeue is None and "cannot be composed from conf/" in stuck[0].notes[0]   # no conf/ here
    assert leaked == []                       # every copy there belongs to a task


def test_a_live_worker_that_reports_the_task_keeps_it(tmp_path):
    """A task with no `exec-run` yet (or any more) is stuck only if no live worker of this queue reports
    it; while one is alive, copies no task names are not judged either (it may be making one)."""
    setting_up, orphaned = "d" * 40, "e" * 40
    repo = fake_repo(tmp_path, {setting_up: (None, True), orphaned: (None, False)}, worker_reports=[setting_up])
    (tmp_path / ".dvc/tmp/exps/tmpleaked").mkdir()
    worker = sleeper(node_marker(repo))
    try:
        (Path(repo.experiments.celery_queue.wdir) / "dvc-exp-worker-1.json").write_text(json.dumps(
            {"pid": worker.pid, "stdin": None, "stdout": None, "stderr": None, "returncode": None}))
        stuck, leaked = tool.find_stuck(repo)
        assert [task.rev for task in stuck] == [orphaned] and stuck[0].pid is None
        assert leaked == []
    finally:
        worker.kill()
        worker.wait()
    stuck, leaked = tool.find_stuck(repo)     # the worker gone: both are stuck, and the stray copy is leaked
    assert [task.rev for task in stuck] == [setting_up, orphaned]
    assert leaked == [tmp_path / ".dvc/tmp/exps/tmpleaked"]


def dead_pid() -> int:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    return ended.pid


def git(where: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=where,
                          check=True, capture_output=True, text=True).stdout.strip()


def test_a_finished_run_whose_collection_was_lost_is_brought_in(tmp_path):
    """Only the worker died, its run went on to the end and recorded its experiment: --clean fetches
    that experiment's ref from the copy (as DVC's collection does), then removes the task and the copy."""
    rev, ref = "f" * 40, "refs/exps/ab/" + "c" * 38 + "/lucky"
    git(tmp_path, "init", "-q")
    git(tmp_path, "commit", "-q", "--allow-empty", "-m", "baseline")
    repo = fake_repo(tmp_path, {rev: (dead_pid(), True)}, results={rev: ref})
    copy = tmp_path / ".dvc/tmp/exps/tmpffffff"
    git(copy, "init", "-q")
    git(copy, "commit", "-q", "--allow-empty", "-m", "the experiment")
    git(copy, "update-ref", ref, "HEAD")
    (stuck,), leaked = tool.find_stuck(repo)
    assert stuck.result_ref == ref and stuck.requeue is None and leaked == []
    out = io.StringIO()
    assert not tool._report(repo, tmp_path, stuck, clean=False, out=out)
    assert "its run finished, only its collection was lost" in out.getvalue() and "experiment lucky" in out.getvalue()
    assert repo.calls == []
    experiment = git(copy, "rev-parse", ref)
    assert tool._report(repo, tmp_path, stuck, clean=True, out=out)
    assert git(tmp_path, "rev-parse", ref) == experiment
    assert repo.calls == [("kill", rev), ("remove", rev)] and not copy.exists()
    assert not (tmp_path / ".dvc/tmp/exps/run" / rev).exists()
    assert out.getvalue().splitlines()[-1].endswith("its run had finished and is now experiment lucky; removed "
                                                    "from the queue, its copy .dvc/tmp/exps/tmpffffff (0.0 MB) deleted")


def test_a_copy_a_process_still_works_in_is_left_alone(tmp_path):
    rev = "9" * 40
    repo = fake_repo(tmp_path, {rev: (dead_pid(), True)})
    copy = tmp_path / ".dvc/tmp/exps/tmp999999"
    stage = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], cwd=copy)
    try:
        (stuck,), _ = tool.find_stuck(repo)
        out = io.StringIO()
        assert stuck.busy == [stage.pid]
        assert not tool._report(repo, tmp_path, stuck, clean=True, out=out)
    finally:
        stage.kill()
        stage.wait()
    assert f"yet processes {stage.pid} still work in its copy .dvc/tmp/exps/tmp999999" in out.getvalue()
    assert repo.calls == [] and copy.is_dir()
