"""`python -m cifarlab check` / `run`: `-S` typos named with a did-you-mean before DVC or Hydra sees them."""

from __future__ import annotations

import sys

import pytest

from cifarlab.__main__ import main as front_door
from cifarlab.config import overrides
from conftest import REPO

CONF = REPO / "conf"


@pytest.mark.parametrize("sets, message", [
    (["train.epoch=3"], "unknown params key `train.epoch` (did you mean `train.epochs`?)"),
    (["+train.epoch=3"], "unknown params key `train.epoch` (did you mean `train.epochs`?)"),   # Hydra's advice
    (["preset=fats"], "-S preset=fats: no such preset (did you mean `fast`?); allowed: assignment10, "),
    (["budget=quik"], "-S budget=quik: no such budget (did you mean `quick`?)"),
    (["trian.epochs=3"], "unknown params key `trian` (did you mean `train`?)"),
    (["train.epochs=0"], "params key `train.epochs` is 0; allowed: a whole number >= 1"),
    (["train.seed=range(1,3)", "preset=assignment7", "train.max_lr=-1"], "params key `train.max_lr` is -1"),
    (["train.epochs"], "-S 'train.epochs': expected key=value"),
])
def test_a_bad_override_is_one_line_naming_it(sets, message, capsys):
    assert front_door(["check", "--conf", str(CONF), *(x for s in sets for x in ("-S", s))]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_good_overrides_and_a_sweep_pass():
    assert overrides.check(["preset=fast", "budget=quick", "train.max_lr=0.5"], CONF) == 1
    assert overrides.check(["train.seed=range(1,4)", "preset=assignment7"], CONF) == 3


def test_run_checks_then_hands_the_same_arguments_to_dvc_exp_run(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(overrides.os, "execvp", lambda path, args: ran.append(args))
    assert front_door(["run", "--conf", str(CONF), "-n", "a7", "-S", "preset=assignment7", "--queue"]) == 0
    assert ran == [[sys.executable, "-m", "dvc", "exp", "run", "-n", "a7", "--queue", "-S", "preset=assignment7"]]
    assert front_door(["run", "--conf", str(CONF), "-S", "preset=assignmnet7"]) == 1 and len(ran) == 1
    assert "did you mean `assignment7`?" in capsys.readouterr().err
