"""`python -m cifarlab exps`: the experiments at 100 columns, what identifies a run first, best first."""

from __future__ import annotations

import pytest

from cifarlab.errors import CifarlabError
from cifarlab.tools import experiments
from cifarlab.tools.experiments import RunInputs, experiments_table

PRESETS = ("assignment7", "assignment8", "assignment10", "fast", "resnet18")


def exp(name: str, preset: str, seed: int, accuracy: float, **extra) -> dict:
    return {"Experiment": name, "rev": f"{abs(hash(name)) % 10**7:07d}", "typ": "branch_commit", "State": None,
            "report.preset": preset, "budget.name": "full", "train.seed": float(seed), "data.source": "cifar10",
            "accuracy": accuracy, "tta_hflip.accuracy": accuracy + 0.004, "tta_translate.accuracy": accuracy + 0.007,
            "max_lr": 0.00123456, "epochs": 24.0, "train_minutes": 37.46, "loss": 0.3,
            "src/cifarlab/pipeline/train.py": "h1", "models/model.pt": f"out-{name}", **extra}


TEN = [exp(f"{preset}-seed-{seed}-long-name", preset, seed, 0.80 + 0.01 * i + 0.001 * seed)
       for i, preset in enumerate(PRESETS) for seed in (1, 2)]
BASELINE = {"Experiment": None, "rev": "main", "typ": "baseline", "State": None, "accuracy": None}


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "params.yaml").write_text("report: {}\nbudget: {}\ntrain: {}\ndata: {}\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  train:\n    cmd: x\n    deps: [src/cifarlab/pipeline/train.py]\n"
                                       "    outs: [models/model.pt]\n")
    return tmp_path


def test_ten_experiments_fit_100_columns_identity_first_best_first(repo, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(experiments, "read_rows", lambda repo: [BASELINE, *TEN])
    assert experiments.main(["--repo", str(repo)]) == 0
    lines = capsys.readouterr().out.splitlines()
    print("\n".join(lines))
    assert max(map(len, lines)) <= 100
    assert lines[0].split() == ["experiment", "preset", "budget", "seed", "data", "acc", "%", "TTA", "%", "max",
                                "LR", "epochs", "minutes"]
    body = lines[1:11]
    accuracies = [float(line.split()[5]) for line in body]
    assert accuracies == sorted(accuracies, reverse=True) and len(body) == 10
    assert body[0].split()[1:5] == ["resnet18", "full", "2", "cifar10"]
    assert body[0].split()[5:] == ["84.20", "84.90", "0.00123", "24", "37.5"]    # TTA: flip + translate
    assert lines[11] == "best: resnet18-seed-2-long-name, 84.20% test accuracy (resnet18, budget full)"
    assert lines[12].startswith("baseline main: the commit holds no results (`dvc exp show` prints `!`")


def test_a_narrow_terminal_cuts_only_the_names(repo):
    text = experiments_table(repo, width=90, rows=TEN)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 90
    assert "…" in lines[1] and lines[1].split()[1] == "resnet18"


def test_a_restored_run_is_listed_once_and_named(repo):
    again = TEN[0] | {"Experiment": "again", "rev": "0000001", "models/model.pt": "another out hash"}
    text = experiments_table(repo, width=100, rows=[*TEN, again])
    assert sum(1 for line in text.splitlines() if line.startswith(("again", TEN[0]["Experiment"][:20]))) == 1
    assert "counted once, one run under several names (same params, code and data)" in text
    assert RunInputs.of_repo(repo).identity(again) == RunInputs.of_repo(repo).identity(TEN[0])


def test_no_finished_experiment_is_one_line(repo):
    with pytest.raises(CifarlabError, match="no finished experiments"):
        experiments_table(repo, rows=[BASELINE, TEN[0] | {"State": "Running"}])
