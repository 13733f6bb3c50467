"""Faults: what a run records is what it ran.

params.yaml edited while a stage runs, a resume state or model file damaged on disk, a full disk:
each is one line naming what went wrong, and nothing is left that DVC would lock for params the
stage did not run, nor a partial file. The cases are the fault rows of docs/pipeline.md's table.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cifarlab import atomic, paths, torchfile
from cifarlab.atomic import DiskFull, atomic_path, write_bytes
from cifarlab.engine.checkpoint import StateWriter, load_checkpoint, save_checkpoint
from cifarlab.engine.classifier import Classifier
from cifarlab.errors import CifarlabError, LAUNCHER_PARAMS_ENV, ParamsChanged, ParamsRead, run_stage
from cifarlab.lifetime import LAUNCHER_PID_ENV
from cifarlab.pipeline.report.summary import read_checkpoint
from conftest import merge, params_in, run, run_script, tool_env, write_params

EDITED = "params.yaml changed while train was running (train.epochs 3 -> 4): nothing was recorded; rerun"


def flip_bytes(path: Path, count: int = 8) -> None:
    """A few bytes in the middle of the file inverted: same size, the kind of damage torch loads silently."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def damage(path: Path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"this is not a torch file\n" * 40)
    else:
        flip_bytes(path)


def one_error_line(stderr: str) -> str:
    """The stage's one `error:` line (tqdm's progress bars aside), without the prefix."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0][len("error: "):]


@pytest.fixture
def in_process(monkeypatch):
    """`run_stage` in the test's own process, which must not die with its parent nor take over Ctrl-C."""
    from cifarlab import errors

    monkeypatch.setattr(errors, "die_with_parent", lambda *args: False)
    monkeypatch.setattr(errors, "stop_on_sigterm", lambda: None)


# --- params.yaml edited while a stage runs -------------------------------------------------------

STAGE_YAML = {"stages": {"train": {"cmd": "python stages/train.py", "params": ["train", "data.train_subset"],
                                   "outs": ["models/model.pt", "metrics/train"],
                                   "metrics": [{"metrics/training.json": {"cache": False}}]}}}
PARAMS = {"data": {"train_subset": 0, "test_subset": 0}, "train": {"epochs": 3, "max_lr": 0.003},
          "report": {"preset": "x"}}


@pytest.fixture
def guarded(tmp_path, monkeypatch, in_process):
    """A directory with a dvc.yaml of one stage, train, and its params.yaml, as the working
    directory of a process that runs `stages/train.py`."""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(STAGE_YAML))
    write_params(tmp_path, PARAMS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages/train.py"])
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.setenv(LAUNCHER_PARAMS_ENV, "")        # so that monkeypatch restores it (absent) afterwards
    monkeypatch.delenv(LAUNCHER_PARAMS_ENV)
    return tmp_path


def stage_writing_outputs(edit=None):
    """A stage main that writes train's outputs, calling `edit()` (the user's edit) in between."""
    def main():
        atomic.write_bytes("models/model.pt", b"weights")
        if edit is not None:
            edit()
        Path("metrics/train").mkdir(parents=True)
        Path("metrics/train/metrics.json").write_text("{}")
        atomic.write_json("metrics/training.json", {"epochs": 3})
    return main


def edit_params(**train):
    def edit():
        write_params(Path("."), merge(PARAMS, {"train": train}))
    return edit


def test_params_edited_mid_run_stop_the_stage_and_remove_its_outputs(guarded, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_stage(stage_writing_outputs(edit_params(epochs=4)))
    assert exit_.value.code == 1
    assert one_error_line(capsys.readouterr().err) == EDITED
    for output in ("models/model.pt", "metrics/train", "metrics/training.json"):
        assert not (guarded / output).exists(), output


def test_every_changed_key_is_named_with_its_old_and_new_value(guarded, capsys):
    with pytest.raises(SystemExit):
        run_stage(stage_writing_outputs(lambda: write_params(Path("."), merge(PARAMS, {
            "data": {"train_subset": 100}, "train": {"epochs": 4, "max_lr": "find", "seed": 1}}))))
    assert one_error_line(capsys.readouterr().err) == (
        "params.yaml changed while train was running (train.epochs 3 -> 4, train.max_lr 0.003 -> find, "
        "data.train_subset 0 -> 100, and 1 more): nothing was recorded; rerun")   # dvc.yaml's order, new keys last


@pytest.mark.parametrize("edit", ["another stage's key", "changed and changed back", "comments only"])
def test_edits_that_leave_the_stages_params_as_they_were_pass(guarded, edit):
    def change():
        if edit == "another stage's key":
            write_params(Path("."), merge(PARAMS, {"report": {"preset": "y"}}))
        elif edit == "changed and changed back":
            edit_params(epochs=4)()
            edit_params(epochs=3)()
        else:
            Path("params.yaml").write_text("# a comment\n" + Path("params.yaml").read_text())
    run_stage(stage_writing_outputs(change))
    assert (guarded / "models/model.pt").read_bytes() == b"weights"
    assert (guarded / "metrics/training.json").exists()


def test_params_yaml_left_unreadable_mid_run_stops_the_stage(guarded, capsys):
    with pytest.raises(SystemExit):
        run_stage(stage_writing_outputs(lambda: Path("params.yaml").write_text("train: [epochs\n")))
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("params.yaml changed while train was running (it cannot be read now: ")
    assert line.endswith("): nothing was recorded; rerun")
    assert not (guarded / "models/model.pt").exists()


def test_dvc_names_the_stage_under_dvc_repro(guarded, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["-c"])
    monkeypatch.setenv("DVC_STAGE", "train")
    with pytest.raises(SystemExit):
        run_stage(stage_writing_outputs(edit_params(epochs=4)))
    assert one_error_line(capsys.readouterr().err) == EDITED


def test_a_process_of_a_distributed_run_checks_what_its_launcher_read(guarded, monkeypatch):
    """Each process a distributed launcher starts reads params.yaml again when it starts: what it
    reads must be what the launcher read (LAUNCHER_PARAMS_ENV), or it stops before training."""
    launcher = ParamsRead.at_start()
    assert launcher is not None and json.loads(os.environ[LAUNCHER_PARAMS_ENV]) == launcher.values
    monkeypatch.setenv(LAUNCHER_PID_ENV, "1")
    assert ParamsRead.at_start() is None                  # same params: the launcher checks at the end
    edit_params(epochs=4)()
    with pytest.raises(ParamsChanged, match=r"\(train\.epochs 3 -> 4\)"):
        ParamsRead.at_start()


def test_no_guard_outside_a_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages/train.py"])
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert ParamsRead.at_start() is None                  # no dvc.yaml: the stage itself says what is missing


def test_a_train_run_whose_params_are_edited_mid_run_fails_and_records_nothing(stage_dir):
    """The issue's run: train.epochs 3, params.yaml edited to 4 once the first epoch is under way.
    The stage trains the 3 epochs it read; without the check DVC would lock (and run-cache) 4."""
    process = subprocess.Popen([sys.executable, "stages/train.py"], cwd=stage_dir, env=tool_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:                           # the announce line: epoch 1 starts
        if line.startswith("train: ") and " epochs x " in line:
            break
    assert process.poll() is None, "train ended before its first epoch"
    write_params(stage_dir, merge(params_in(stage_dir), {"train": {"epochs": 4}}))
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert one_error_line(stderr) == EDITED
    assert "epoch   3" in stdout and "epoch   4" not in stdout          # it ran what it read
    stage = yaml.safe_load((stage_dir / "dvc.yaml").read_text())["stages"]["train"]
    from cifarlab import dvcfile
    for output in dvcfile.paths(stage, *dvcfile.OUT_KINDS):
        assert not (stage_dir / output).exists(), output


# --- the resume state is checked against its digest --------------------------------------------------

def trained_state() -> dict:
    """A real model + Adam state after a step, as the resume state holds them."""
    torch.manual_seed(0)
    model = Classifier("a7_net")
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return {"fingerprint": "f" * 64, "epoch": 2, "trainables": {"model": model.state_dict(),
                                                                 "optimizer": optimizer.state_dict()},
            "processes": [{"rng": {"torch": torch.get_rng_state()}}],
            "record": {"history": {name: [0.5, 0.4] for name in paths.TRAIN_LOGGED}, "lrs": [1e-3] * 10,
                       "epoch_seconds": [1.0, 1.0], "images_per_second": [5.0, 5.0], "phases": [{}, {}]}}


def saved_state(directory: Path) -> Path:
    writer = StateWriter()
    writer.save(directory / f"{'f' * 64}.pt", trained_state())
    writer.wait()
    return directory / f"{'f' * 64}.pt"


def test_a_saved_state_resumes(tmp_path, capsys):
    from cifarlab.engine.resume import load_resume_state

    saved_state(tmp_path)
    state = load_resume_state("f" * 64, tmp_path)
    assert state is not None and state.epoch == 2
    assert "resuming from the end of epoch 2" in capsys.readouterr().out


def test_a_state_with_flipped_bytes_is_not_resumed(tmp_path, capsys):
    """torch itself loads it without complaint (the damage the issue trained to nan from)."""
    from cifarlab.engine.resume import load_resume_state

    path = saved_state(tmp_path)
    flip_bytes(path)
    torch.load(path, weights_only=False)                  # what torch alone would have resumed from
    assert load_resume_state("f" * 64, tmp_path) is None
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"train: saved state {path} is damaged: its content does not match the digest")
    assert line.endswith("; starting fresh (a damaged state is never resumed; it is replaced after the first epoch)")


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_an_unreadable_state_is_not_resumed(tmp_path, capsys, how):
    from cifarlab.engine.resume import load_resume_state

    path = saved_state(tmp_path)
    damage(path, how)
    assert load_resume_state("f" * 64, tmp_path) is None
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"train: saved state {path} is ") and line.endswith("starting fresh (a damaged state "
                                                                               "is never resumed; it is replaced "
                                                                               "after the first epoch)")


def test_a_state_without_a_digest_is_not_resumed(tmp_path, capsys):
    from cifarlab.engine.resume import load_resume_state

    torch.save(trained_state(), tmp_path / f"{'f' * 64}.pt")
    assert load_resume_state("f" * 64, tmp_path) is None
    assert "has no content digest" in capsys.readouterr().out


def test_the_digest_is_the_same_after_a_round_trip_in_any_layout(tmp_path):
    weights = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    shared = torch.arange(10.0)
    state = {"cl": weights, "bf16": torch.randn(7).bfloat16(), "view": shared[2:5], "base": shared,
             "empty": torch.zeros(0), "np": __import__("numpy").arange(5), "rng": (3, (1, 2, 3), None),
             "dtype": torch.float16, "lrs": [0.1, 0.2]}
    torch.save(torchfile.sealed(state), tmp_path / "s.pt")
    loaded = torchfile.load(tmp_path / "s.pt", "state")
    assert loaded["cl"].is_contiguous(memory_format=torch.channels_last)
    assert torchfile.content_digest(loaded) == torchfile.content_digest(state)
    state["lrs"][1] = 0.3
    assert torchfile.content_digest(state) != loaded[torchfile.DIGEST_KEY]


# --- models/model.pt: every reader names it in one line ---------------------------------------------

DAMAGE = ["empty", "truncated", "garbage", "flipped bytes"]


@pytest.fixture
def model_file(tmp_path) -> Path:
    save_checkpoint(tmp_path / "model.pt", Classifier("a7_net"), epoch=3, max_lr=0.01, params={"x": 1})
    return tmp_path / "model.pt"


@pytest.mark.parametrize("how", DAMAGE)
def test_load_checkpoint_names_a_damaged_file_in_one_line(model_file, how):
    damage(model_file, how)
    with pytest.raises(CifarlabError) as err:
        load_checkpoint(model_file)
    message = str(err.value)
    assert message.startswith(f"checkpoint {model_file} is ") and "\n" not in message
    assert message.endswith("`dvc repro train` restores it (from DVC's run-cache, or by training again)")
    if how == "flipped bytes":
        assert "does not match the digest" in message


@pytest.mark.parametrize("how", DAMAGE)
def test_the_reports_checkpoint_read_names_a_damaged_file_in_one_line(model_file, how):
    damage(model_file, how)
    with pytest.raises(CifarlabError) as err:
        read_checkpoint(model_file)
    assert str(err.value).startswith(f"checkpoint {model_file} is ") and "\n" not in str(err.value)


def test_a_sealed_checkpoint_reads_back_and_an_older_one_still_loads(model_file, tmp_path):
    assert read_checkpoint(model_file)["epoch"] == 3
    older = {"arch": "a7_net", "state_dict": Classifier("a7_net").state_dict(), "max_lr": 0.01, "params": {}}
    torch.save(older, tmp_path / "older.pt")              # written before checkpoints were sealed
    assert load_checkpoint(tmp_path / "older.pt")[1]["arch"] == "a7_net"


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
def test_a_model_saved_on_any_device_and_layout_loads_checked_on_the_cpu(tmp_path, device):
    """The digest is of the content, not of where it was: a model trained on CUDA in channels_last
    is sealed there and checked where it is loaded."""
    model = Classifier("a7_net").to(device).to(memory_format=torch.channels_last)
    save_checkpoint(tmp_path / "model.pt", model, epoch=1)
    loaded, info = load_checkpoint(tmp_path / "model.pt")
    assert torchfile.DIGEST_KEY in info and next(loaded.parameters()).device.type == "cpu"


@pytest.mark.parametrize("stage", ["evaluate", "report"])
def test_evaluate_and_report_on_a_damaged_model_are_one_line(tiny_run, tmp_path, stage):
    work = tmp_path / "work"
    shutil.copytree(tiny_run, work)
    flip_bytes(work / paths.CHECKPOINT)
    result = run_script(work, f"stages/{stage}.py", check=False)
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert line.startswith(f"checkpoint {paths.CHECKPOINT} is damaged: its content does not match the digest")


# --- a full disk ----------------------------------------------------------------------------------

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_an_output_write_that_hits_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    write_bytes(tmp_path / "model.pt", b"old")
    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(DiskFull) as err:
        write_bytes(tmp_path / "model.pt", b"x" * 26_000_000)
    assert str(err.value).startswith(f"the disk is full: cannot write {tmp_path / 'model.pt'} (it needs about "
                                     f"26.0 MB; ")
    assert str(err.value).endswith(f"free in {tmp_path}/); free some space and rerun")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"] and (tmp_path / "model.pt").read_bytes() == b"old"


def test_a_model_write_that_hits_a_full_disk_names_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(DiskFull, match=r"cannot write .*model\.pt \(it needs about 1\.9 MB"):
        save_checkpoint(tmp_path / "models" / "model.pt", Classifier("a7_net"))
    monkeypatch.undo()
    assert list((tmp_path / "models").iterdir()) == []


def test_torchs_own_words_for_a_write_on_a_full_disk_are_a_disk_full_line(tmp_path, monkeypatch):
    """torch.save to a path writes through its C++ writer, which says `[enforce fail at
    inline_container.cc:...]` when the disk is full (/dev/full: every write fails with ENOSPC)."""
    monkeypatch.setattr(atomic, "_free_bytes", lambda directory: 0)
    with pytest.raises(DiskFull, match=r"the disk is full: cannot write .*state\.pt \(it needs about 4\.0 MB; "
                                       r"0 bytes free"):
        with atomic_path(tmp_path / "state.pt", size=4_000_000):
            torch.save({"x": torch.zeros(1_000_000)}, "/dev/full")
    monkeypatch.setattr(atomic, "_free_bytes", lambda directory: 10 << 30)
    with pytest.raises(RuntimeError, match="inline_container"):      # space left: not a full disk
        with atomic_path(tmp_path / "state.pt"):
            torch.save({"x": torch.zeros(1_000_000)}, "/dev/full")
    assert list(tmp_path.iterdir()) == []


def full_disk_for_state(monkeypatch, module) -> None:
    """The resume state's writes go to /dev/full: the kernel's ENOSPC, through torch.save."""
    real_open = open
    monkeypatch.setattr(module, "open", lambda path, mode="r", *a, **k: real_open("/dev/full", mode), raising=False)


def test_the_state_writer_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    from cifarlab.engine import checkpoint

    full_disk_for_state(monkeypatch, checkpoint)
    writer = StateWriter()
    writer.save(tmp_path / "state.pt", trained_state())
    with pytest.raises(CifarlabError) as err:
        writer.wait()
    assert str(err.value).startswith(f"the disk is full: cannot write the training state {tmp_path / 'state.pt'} "
                                     f"(it needs about 5.6 MB; ")
    assert list(tmp_path.iterdir()) == []


def test_an_unexpected_write_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys, in_process):
    """A write outside `cifarlab.atomic` (dvclive's own files) that hits a full disk."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_stage(lambda: no_space())
    assert exit_.value.code == 1
    assert one_error_line(capsys.readouterr().err) == (
        "the disk is full (No space left on device); free some space and rerun")


PATCHED_STAGE = """import runpy, sys
sys.path[:0] = ["src", "stages"]
from cifarlab.engine import checkpoint
real_open = open
checkpoint.open = lambda path, mode="r", *a, **k: real_open("/dev/full", mode)
sys.argv = ["stages/train.py"]
runpy.run_path("stages/train.py", run_name="__main__")
"""


def test_a_train_run_on_a_full_disk_is_one_line_and_leaves_no_partial_state(stage_dir):
    """The first epoch's state cannot be written; the second epoch's save reports it. Small subsets: the
    epochs are not what this checks."""
    write_params(stage_dir, merge(params_in(stage_dir), {"data": {"train_subset": 100, "test_subset": 50}}))
    result = run([sys.executable, "-c", PATCHED_STAGE], stage_dir, check=False)
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert line.startswith("the disk is full: cannot write the training state .cache/train/")
    assert "(it needs about " in line and line.endswith("free some space and rerun")
    assert list((stage_dir / ".cache/train").iterdir()) == []
    assert not (stage_dir / "models/model.pt").exists()
