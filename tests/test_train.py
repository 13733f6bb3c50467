"""Training: divergence guard, resume after interruption, determinism, clear errors."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from cifarlab import dvcfile
from cifarlab.engine.loops import DivergenceGuard, TrainingDiverged
from conftest import (ScriptProcess, composed_tiny, make_stage_dir, merge, params_in, run_script, start_script,
                      write_params)

# a7_net with dropout: small and fast, and its dropout draws from the global RNG, so an exact
# resume must restore RNG state as well as weights.
FAST = {"model": {"name": "a7_net", "dropout": 0.05},
        "train": {"epochs": 3, "batch_size": 64, "max_lr": 0.01, "max_at_epoch": 1},
        "runtime": {"deterministic": True}}
# For the tests that stop a run with a signal: long enough that the signal always lands mid-training
# on a fast machine, and the signal ends it long before its last epoch.
LONG_RUN = 200
ONE_EPOCH = {"train": {"epochs": 1}}   # for the tests that only read how a run starts


def train_in(work: Path, override: dict | None = None, check: bool = True):
    if override:
        write_params(work, merge(json.loads(json.dumps(params_in(work))), override))
    return run_script(work, "stages/train.py", check=check)


def outputs(work: Path) -> tuple[dict, dict]:
    metrics = json.loads((work / "metrics/train/metrics.json").read_text())
    weights = torch.load(work / "models/model.pt", weights_only=False)["state_dict"]
    return metrics, weights


def state_files(work: Path) -> list[Path]:
    """The resume states train keeps under .cache/train/ (one per run fingerprint)."""
    return sorted((work / ".cache/train").glob("*.pt"))


def wait_for_state(work: Path, process: ScriptProcess, epoch: int = 1, timeout: float = 300) -> None:
    """Until a state holding at least `epoch` complete epochs is saved; fails if the run ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "the run ended before a signal could reach it mid-training"
        files = state_files(work)
        if files:
            try:
                if torch.load(files[0], weights_only=False)["epoch"] >= epoch:
                    return
            except Exception:      # being replaced right now
                pass
        time.sleep(0.05)
    raise AssertionError(f"no state with {epoch} complete epoch(s) within {timeout} s")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- divergence guard -----------------------------------------------------------------------------

def guard_after(losses: list[float], factor: float = 4.0) -> DivergenceGuard:
    guard = DivergenceGuard(factor, torch.device("cpu"))
    for step, loss in enumerate(losses):
        guard.update(torch.tensor(loss), step)
    return guard


def test_guard_quiet_on_a_normal_curve():
    guard_after([2.3 * math.exp(-0.05 * s) + 0.1 for s in range(200)]).check([1e-3] * 200, 10)


def test_guard_trips_on_nan_and_names_epoch_step_lr():
    guard = guard_after([2.3, 2.0, 1.8, float("nan"), 1.0])
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 3 \(lr 0\.69\): loss nan is not finite"):
        guard.check([0.1, 0.2, 0.3, 0.69, 0.7], 98)


def test_guard_trips_on_explosion():
    losses = [0.5] * 50 + [30.0] * 20
    with pytest.raises(TrainingDiverged, match="exceeded 4 x its best.*lower train.max_lr"):
        guard_after(losses).check([0.01] * 70, 10)


def test_absurd_max_lr_stops_training(stage_dir):
    result = train_in(stage_dir, merge(FAST, {"train": {"max_lr": 1.0e4, "epochs": 2}}), check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged at epoch" in errors[0] and "lower train.max_lr" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (stage_dir / "models/model.pt").exists()


def test_sane_max_lr_trains_and_keeps_the_last_epoch(stage_dir):
    train_in(stage_dir, FAST)
    metrics, _ = outputs(stage_dir)
    assert metrics["epochs"] == 3 and metrics["step"] == 3
    assert state_files(stage_dir) == []            # a completed run leaves no resume state: a rerun starts over
                                                   # (tests/e2e/test_interrupt.py reruns one and sees it)
    tsv = (stage_dir / "metrics/train/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in tsv[1:]] == ["1", "2", "3"]


# --- resume and determinism -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted deterministic run in a stage directory of its own, once for this module's
    tests: (its directory, its metrics, its weights)."""
    work = make_stage_dir(tmp_path_factory.mktemp("reference") / "work", merge(composed_tiny(), FAST))
    train_in(work)
    return (work, *outputs(work))


def fresh_copy(stage_dir: Path, tmp_path: Path, name: str) -> Path:
    import shutil
    other = tmp_path / name
    outputs_ = {"models", "metrics", "plots", ".cache"}       # the run's outputs, at the top level only
    shutil.copytree(stage_dir, other, ignore=lambda d, names: outputs_ & set(names) if Path(d) == stage_dir else [])
    return other


def test_same_params_give_identical_metrics_and_weights(reference, tmp_path):
    done, reference_metrics, reference_weights = reference
    again = fresh_copy(done, tmp_path, "again")
    train_in(again)
    metrics, weights = outputs(again)
    assert metrics == reference_metrics
    assert_same_weights(weights, reference_weights)
    assert (again / "plots/lr_schedule.csv").read_text() == (done / "plots/lr_schedule.csv").read_text()
    # Byte for byte, as DVC hashes it: else evaluate and report rerun and no run-cache entry matches.
    import hashlib
    md5 = [hashlib.md5((work / "models/model.pt").read_bytes()).hexdigest() for work in (again, done)]
    assert md5[0] == md5[1]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(reference, tmp_path):
    done, reference_metrics, reference_weights = reference
    work = fresh_copy(done, tmp_path, "killed")
    process = start_script(work, "stages/train.py")
    wait_for_state(work, process)
    time.sleep(0.3)                      # into epoch 2
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    [state] = state_files(work)
    assert torch.load(state, weights_only=False)["epoch"] in (1, 2)
    assert not (work / "models/model.pt").exists()

    resumed = train_in(work)
    assert "resuming from the end of epoch" in resumed.stdout
    metrics, weights = outputs(work)
    assert metrics == reference_metrics
    assert_same_weights(weights, reference_weights)
    tsv = (work / "metrics/train/plots/metrics/test/accuracy.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in tsv[1:]] == ["1", "2", "3"]   # no duplicated or missing epochs
    assert state_files(work) == []


def fingerprint_of(work: Path, raw: dict, monkeypatch) -> str:
    from cifarlab.engine.runtime import select_runtime
    from cifarlab.config.params import parse_params
    from cifarlab.engine.resume import run_fingerprint
    from cifarlab.pipeline.train import resolve_max_lr

    monkeypatch.chdir(work)
    params = parse_params(raw)
    return run_fingerprint(params, select_runtime(params.runtime), resolve_max_lr(params.train.max_lr))


def test_a_different_run_never_resumes(stage_dir, monkeypatch):
    """A state left by another run (other params, data or code: another fingerprint) is not resumed."""
    write_params(stage_dir, merge(params_in(stage_dir), merge(FAST, ONE_EPOCH)))
    other = fingerprint_of(stage_dir, merge(params_in(stage_dir), {"train": {"max_lr": 0.005}}), monkeypatch)
    (stage_dir / ".cache/train").mkdir(parents=True)
    torch.save({"fingerprint": other, "epoch": 2}, stage_dir / f".cache/train/{other}.pt")
    result = train_in(stage_dir)
    assert "is from a different run" in result.stdout and "starting fresh" in result.stdout
    assert outputs(stage_dir)[0]["max_lr"] == 0.01
    assert state_files(stage_dir) == [stage_dir / f".cache/train/{other}.pt"]   # another run's state is kept


def test_unreadable_state_starts_fresh(stage_dir, monkeypatch):
    write_params(stage_dir, merge(params_in(stage_dir), merge(FAST, ONE_EPOCH)))
    fingerprint = fingerprint_of(stage_dir, params_in(stage_dir), monkeypatch)
    (stage_dir / ".cache/train").mkdir(parents=True)
    (stage_dir / f".cache/train/{fingerprint}.pt").write_bytes(b"not a checkpoint")
    result = train_in(stage_dir)
    assert "is unreadable" in result.stdout and "starting fresh" in result.stdout
    assert state_files(stage_dir) == []


def test_ctrl_c_saves_the_last_complete_epoch(stage_dir):
    write_params(stage_dir, merge(params_in(stage_dir), merge(FAST, {"train": {"epochs": LONG_RUN}})))
    process = start_script(stage_dir, "stages/train.py")
    wait_for_state(stage_dir, process)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted during epoch" in errors[0] and "rerun to resume" in errors[0]
    assert "Traceback" not in stderr
    [state] = state_files(stage_dir)
    assert torch.load(state, weights_only=False)["epoch"] >= 1


def test_sigterm_stops_like_ctrl_c(stage_dir):
    write_params(stage_dir, merge(params_in(stage_dir), merge(FAST, {"train": {"epochs": LONG_RUN}})))
    process = start_script(stage_dir, "stages/train.py")
    wait_for_state(stage_dir, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted (SIGTERM) during epoch" in errors[0], stderr
    assert "Traceback" not in stderr and "rerun to resume" in errors[0]


# --- clear errors -----------------------------------------------------------------------------------

def test_max_lr_find_without_lr_find_output(stage_dir):
    result = train_in(stage_dir, {"train": {"max_lr": "find"}}, check=False)
    assert result.returncode == 1
    assert "train.max_lr is `find` but metrics/max_lr.json is missing; run `dvc repro max_lr`" in result.stderr


def test_batch_larger_than_training_split(stage_dir):
    # The params check catches this for synthetic data; the loader check covers CIFAR-10 and any
    # data on disk whose size differs from params: here params claim 100,000 images, disk has 512.
    result = train_in(stage_dir, {"data": {"synthetic_train_size": 100000}, "train": {"batch_size": 600}},
                      check=False)
    assert result.returncode == 1
    assert "train.batch_size is 600; allowed: at most the training split size (512)" in result.stderr


def test_fingerprint_depends_on_code_data_andparams_in(stage_dir, monkeypatch):
    from cifarlab.engine.runtime import select_runtime
    from cifarlab.config.params import parse_params
    from cifarlab.engine.resume import run_fingerprint, train_deps

    monkeypatch.chdir(stage_dir)
    params = parse_params(params_in(stage_dir))
    runtime = select_runtime(params.runtime)
    base = run_fingerprint(params, runtime, 0.01)
    assert run_fingerprint(params, runtime, 0.01) == base
    assert run_fingerprint(params, runtime, 0.02) != base
    changed = parse_params(merge(params_in(stage_dir), {"augment": {"hflip": 0.0}}))
    assert run_fingerprint(changed, runtime, 0.01) != base
    for subset in ({"train_subset": 100}, {"test_subset": 100}):      # other images: not the same run
        assert run_fingerprint(parse_params(merge(params_in(stage_dir), {"data": subset})), runtime, 0.01) != base
    # code: exactly the files dvc.yaml lists as train's deps (one list for DVC and for resuming)
    for module in ("pipeline/report/document.py", "engine/gradcam.py", "engine/metrics.py"):   # not train's deps,
        assert f"src/cifarlab/{module}" not in train_deps(stage_dir)                             # so the state survives
        with open(stage_dir / "src/cifarlab" / module, "a") as handle:
            handle.write("\n# an edit train does not depend on\n")
    assert run_fingerprint(params, runtime, 0.01) == base
    with open(stage_dir / "src/cifarlab/pipeline/train.py", "a") as handle:  # a train dep: a different run
        handle.write("\n# an edit train depends on\n")
    changed_code = run_fingerprint(params, runtime, 0.01)
    assert changed_code != base
    (stage_dir / "data/meta.json").write_text((stage_dir / "data/meta.json").read_text() + " ")
    assert run_fingerprint(params, runtime, 0.01) not in (base, changed_code)


def test_fingerprint_files_are_the_train_stage_deps(stage_dir):
    from cifarlab.engine.resume import train_deps

    stages = yaml.safe_load((stage_dir / "dvc.yaml").read_text())["stages"]
    assert train_deps(stage_dir) == dvcfile.paths(stages["train"], "deps")
    assert "src/cifarlab/pipeline/report/document.py" not in train_deps(stage_dir)
    (stage_dir / "dvc.yaml").unlink()
    result = train_in(stage_dir, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot read the train stage's deps from dvc.yaml" in result.stderr


# --- runtime.compile ------------------------------------------------------------------------------

def fit_here(raw_params: dict) -> None:
    """The train stage's `fit`, in this process (so torch.compile can be replaced), in the current directory."""
    from cifarlab.data.storage import load_dataset
    from cifarlab.engine.runtime import select_runtime
    from cifarlab.config.params import parse_params
    from cifarlab.pipeline.train import fit

    params = parse_params(raw_params)
    fit(params, load_dataset(Path("data")), select_runtime(params.runtime))


@pytest.mark.parametrize("compile_", [False, True])
def test_runtime_compile_trains_through_torch_compile(stage_dir, tiny_params, monkeypatch, compile_):
    """With runtime.compile the training step runs through torch.compile's module (here a recording
    stand-in: a real compilation is slow on a CPU); evaluation and the checkpoint use the
    plain module, whose parameters the compiled one shares; train_speed.json says which ran."""
    compiled = []

    def record(model, *args, **kwargs):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", record)
    monkeypatch.chdir(stage_dir)
    fit_here(merge(tiny_params, merge(FAST, {"train": {"epochs": 1}, "runtime": {"compile": compile_}})))
    assert len(compiled) == int(compile_)
    assert json.loads(Path("metrics/train_speed.json").read_text())["compile"] is compile_


def test_a_failing_torch_compile_is_one_clear_line(stage_dir, tiny_params, monkeypatch):
    """A machine where inductor cannot compile (no C++ compiler, say) gets a one-line error naming
    runtime.compile, not a compiler traceback."""
    import torch._dynamo.exc

    from cifarlab.errors import CifarlabError

    class Uncompilable(torch.nn.Module):
        def forward(self, *args):
            raise torch._dynamo.exc.TorchDynamoException("C++ compile error: no compiler found")

    monkeypatch.setattr(torch, "compile", lambda model, *args, **kwargs: Uncompilable())
    monkeypatch.chdir(stage_dir)
    with pytest.raises(CifarlabError) as err:
        fit_here(merge(tiny_params, merge(FAST, {"runtime": {"compile": True}})))
    assert str(err.value) == ("runtime.compile is true but torch.compile failed in epoch 1: C++ compile error: "
                              "no compiler found; set runtime.compile: false")
