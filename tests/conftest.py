"""Shared fixtures: the repo's params with tiny synthetic settings, and a runner for stage scripts."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Small enough for a 2-core CPU, big enough that the custom ResNet learns the synthetic set.
TINY = {
    "data": {"source": "synthetic", "synthetic_train_size": 512, "synthetic_test_size": 200},
    "lr_find": {"start_lr": 1.0e-5, "num_iter": 30, "end_lr": 1.0},
    "train": {"epochs": 3, "batch_size": 32, "max_at_epoch": 1, "max_lr": 0.003},
    "evaluate": {"batch_size": 200, "gallery_size": 10},
}


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture
def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def tiny_params(default_params) -> dict:
    return merge(default_params, TINY)


def tool_env() -> dict:
    """Environment in which `python` and `dvc` are this interpreter's, with no network use by DVC."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def write_params(directory: Path, params: dict) -> None:
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_stages(work: Path) -> None:
    """Put the repo's stage scripts (stages/_src.py included) under work/stages/."""
    (work / "stages").mkdir(parents=True)
    for script in (REPO / "stages").glob("*.py"):
        (work / "stages" / script.name).write_text(script.read_text())


def copy_code(work: Path) -> None:
    """The stage scripts, src/ and dvc.yaml under work/: what train needs to run there as in the repo
    (its run fingerprint hashes the files dvc.yaml lists as train's deps, relative to the working directory)."""
    import shutil

    copy_stages(work)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(REPO / "dvc.yaml", work / "dvc.yaml")


@pytest.fixture
def stage_dir(tmp_path, tiny_params):
    """A working directory with the stage scripts, tiny params and the synthetic dataset written:
    stages run in it as `python stages/<name>.py`, exactly as `dvc repro` runs them."""
    from cifarlab.sources import make_synthetic
    from cifarlab.storage import save_dataset

    work = tmp_path / "work"
    copy_code(work)
    write_params(work, tiny_params)
    data = tiny_params["data"]
    save_dataset(make_synthetic(data["synthetic_train_size"], data["synthetic_test_size"], data["synthetic_seed"]),
                 work / "data")
    return work


# The tiny run's evaluate settings: sizes that differ from the defaults and from each other, so
# the outputs must follow params; TTA on, so its figures appear beside the plain ones.
TINY_RUN_EVALUATE = {"gallery_size": 6, "gradcam_size": 4, "tta_hflip": True, "tta_translate": True}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The five stage scripts run once, in order, on the tiny synthetic set, as `dvc repro` would
    run them. Shared by the evaluate and report tests, which only read it (copy it to change it)."""
    work = tmp_path_factory.mktemp("tiny_run") / "work"
    copy_code(work)
    write_params(work, merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                             merge(TINY, {"evaluate": TINY_RUN_EVALUATE})))
    for stage in ("download", "lr_find", "max_lr", "train", "evaluate", "report"):
        run(["python", f"stages/{stage}.py"], work)
    return work
