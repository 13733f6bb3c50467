"""The max_lr stage: train depends on the resolved max LR, so a new range test retrains only with `find`."""

from __future__ import annotations

import json

import pytest
import yaml

from cifarlab import dvcfile

from conftest import REPO, merge, run_script, write_params

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_train_depends_on_the_resolved_max_lr_not_the_range_test():
    deps = dvcfile.paths(STAGES["train"], "deps")
    assert "metrics/max_lr.json" in deps and "metrics/lr_find.json" not in deps
    assert STAGES["max_lr"]["params"] == ["train.max_lr"]
    assert "metrics/lr_find.json" in STAGES["max_lr"]["deps"]
    assert STAGES["max_lr"]["outs"] == ["metrics/max_lr.json"]


def test_resolve_a_number_never_reads_lr_find(tmp_path):
    from cifarlab.pipeline.max_lr import resolve

    missing = tmp_path / "absent.json"
    assert resolve(0.003, missing) == {"max_lr": 0.003, "chosen_by": "params", "train.max_lr": 0.003}


def test_resolve_find_takes_the_suggestion_with_its_rule(tmp_path):
    from cifarlab.errors import CifarlabError
    from cifarlab.pipeline.max_lr import resolve

    found = tmp_path / "lr_find.json"
    found.write_text(json.dumps({"max_lr": 2e-3, "rule": "min_div_10", "loss_minimum_lr": 2e-2, "iterations": 30}))
    assert resolve("find", found) == {"max_lr": 2e-3, "chosen_by": "lr_find", "train.max_lr": "find",
                                      "rule": "min_div_10", "loss_minimum_lr": 2e-2}
    found.write_text(json.dumps({"max_lr": 2e-3}))
    with pytest.raises(CifarlabError, match="train.max_lr is `find` but .* is missing or incomplete"):
        resolve("find", found)


def test_read_refuses_a_file_resolved_for_another_max_lr(tmp_path):
    from cifarlab.atomic import write_json
    from cifarlab.errors import CifarlabError
    from cifarlab.pipeline.max_lr import read, resolve

    resolved = tmp_path / "max_lr.json"
    assert read(0.003, resolved)["max_lr"] == 0.003          # no file: a number needs no resolving
    with pytest.raises(CifarlabError, match="`find` but .* is missing; run `dvc repro max_lr`"):
        read("find", resolved)
    write_json(resolved, resolve(0.003))
    assert read(0.003, resolved)["max_lr"] == 0.003
    with pytest.raises(CifarlabError, match="resolved for train.max_lr 0.003 but params.yaml has 0.01"):
        read(0.01, resolved)
    with pytest.raises(CifarlabError, match="resolved for train.max_lr 0.003 but params.yaml has find"):
        read("find", resolved)


def test_stage_writes_the_same_bytes_for_a_number_whatever_the_range_test_found(tmp_path, tiny_params):
    """The property that keeps train from rerunning when only lr_find.* changed: with a number the
    stage's output does not depend on metrics/lr_find.json; with `find` it does."""
    from conftest import copy_code

    work = tmp_path / "work"
    copy_code(work)
    (work / "metrics").mkdir()
    outputs = {}
    for max_lr in (0.003, "find"):
        write_params(work, merge(tiny_params, {"train": {"max_lr": max_lr}}))
        for suggestion in (1e-3, 4e-3):
            (work / "metrics/lr_find.json").write_text(json.dumps(
                {"max_lr": suggestion, "rule": "min_div_10", "loss_minimum_lr": 10 * suggestion}))
            result = run_script(work, "stages/max_lr.py")
            outputs[max_lr, suggestion] = (work / "metrics/max_lr.json").read_bytes()
        print(result.stdout)
    assert outputs[0.003, 1e-3] == outputs[0.003, 4e-3]
    assert json.loads(outputs[0.003, 1e-3])["max_lr"] == 0.003
    assert outputs["find", 1e-3] != outputs["find", 4e-3]
    assert json.loads(outputs["find", 4e-3])["max_lr"] == 4e-3
    assert "max_lr: 0.004 from lr_find's `min_div_10` rule (loss minimum at 0.04)" in result.stdout


def test_lr_find_depends_on_train_max_lr_to_know_whether_to_run():
    """lr_find runs the range test only for `find` (or lr_find.when `always`), so it reads train.max_lr;
    with a number it writes the same bytes whatever the number, so max_lr and train follow only the number."""
    assert "train.max_lr" in STAGES["lr_find"]["params"] and "lr_find" in STAGES["lr_find"]["params"]


def test_a_range_test_that_was_not_run_resolves_a_number_and_refuses_find(tmp_path):
    from cifarlab.atomic import write_json
    from cifarlab.errors import CifarlabError
    from cifarlab.pipeline.lr_find import NOT_RUN
    from cifarlab.pipeline.max_lr import resolve

    found = tmp_path / "lr_find.json"
    write_json(found, NOT_RUN)
    assert resolve(1.5, found) == {"max_lr": 1.5, "chosen_by": "params", "train.max_lr": 1.5}
    with pytest.raises(CifarlabError, match=r"^train.max_lr is `find` but .*lr_find.json records no range test "
                                            r"\(lr_find ran for a numeric train.max_lr\); run `dvc repro lr_find`"):
        resolve("find", found)
    found.write_text("[1, 2]")
    with pytest.raises(CifarlabError, match="is missing or incomplete"):
        resolve("find", found)
