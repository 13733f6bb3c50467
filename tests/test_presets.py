"""Presets: every assignment by name, composed from conf/ by DVC's Hydra integration.

`dvc exp run -S preset=assignment7` composes conf/config.yaml (the base: every key) with
conf/preset/assignment7.yaml into params.yaml. These tests compose exactly as DVC does
(`dvc.utils.hydra.compose_and_dump`, the function `dvc exp run` calls), check each preset against
its seed write-up and check the default composition is the committed params.yaml (tests/e2e/test_preset_runs.py runs
two presets end to end as named experiments in a temporary repo).

Regenerate params.yaml after editing conf/:  python -m cifarlab compose
"""

from __future__ import annotations

import shutil
import sys

import pytest
import yaml

from cifarlab.config.compose import PARAMS_HEADER, body, params_text, uncommented
from cifarlab.config.lr_rules import RULES
from conftest import REPO, run
from conftest import composed as compose, composed_text as compose_text   # this checkout's conf/

CONF = REPO / "conf"
DEFAULT_PRESET = "assignment10"
DEFAULT_BUDGET = "full"
BUDGETS = sorted(path.stem for path in (CONF / "budget").glob("*.yaml"))   # the folder is the one list of names

# The seeds' recipe numbers (the write-ups each conf/preset/*.yaml names): model, batch size, epochs, and the target
# accuracy where the write-up states one (assignment 7 and 8 do not: see their preset files).
# "writeup" is the test accuracy each write-up reported itself: its last epoch's "Test set" line (A7
# 8361/10000, A8 3345/10000 after diverging, A10 long write-up 9264/10000) or, for S11, the "~82%" of
# its text (its "Test set" lines count the 50,000 training images).
SEEDS = {
    "assignment7": {"model": "a7_net", "batch_size": 128, "epochs": 20, "target": 0.80, "writeup": 0.8361},
    "assignment8": {"model": "custom_resnet_a8", "batch_size": 512, "epochs": 24, "target": 0.90, "writeup": 0.3345},
    "assignment10": {"model": "custom_resnet", "batch_size": 512, "epochs": 24, "target": 0.90, "writeup": 0.9264},
    "session11": {"model": "resnet18", "batch_size": 512, "epochs": 20, "target": 0.85, "writeup": 0.82},
}

# What every preset sets itself: the keys the base leaves as `???` (Hydra's "missing"), so a recipe
# value lives only in its preset and none inherits another assignment's recipe from the base.
RECIPE = {section: [key for key, value in keys.items() if value == "???"]
          for section, keys in yaml.safe_load((CONF / "config.yaml").read_text()).items()
          if isinstance(keys, dict) and "???" in keys.values()}


def test_the_recipe_is_the_assignment_recipe():
    assert set(RECIPE) == {"model", "augment", "optim", "train", "report"}
    assert "max_lr" in RECIPE["train"] and "seed" not in RECIPE["train"] and "preset" in RECIPE["report"]


def test_a_recipe_key_a_preset_leaves_unset_is_one_clear_line(tmp_path):
    from cifarlab.config.params import ParamsError, parse_params

    raw = compose()
    raw["train"]["epochs"] = "???"          # what Hydra writes for a `???` no preset filled in
    with pytest.raises(ParamsError, match=r"params key `train.epochs` has no value \(`\?\?\?`\): .*conf/preset/"):
        parse_params(raw)

# --- composition ------------------------------------------------------------------------------

def test_hydra_is_enabled_and_the_base_comes_before_the_preset():
    from configobj import ConfigObj

    assert ConfigObj(str(REPO / ".dvc" / "config"))["hydra"]["enabled"].lower() == "true"
    defaults = yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]
    assert defaults == ["_self_", {"preset": DEFAULT_PRESET}, {"budget": DEFAULT_BUDGET}]   # a budget overrides a preset


# Presets that reproduce no write-up: tested in their own files (tests/test_fast_preset.py, tests/test_muon.py).
OTHER_PRESETS = {"fast", "fast_muon"}


def test_one_preset_file_per_assignment():
    files = sorted(p.stem for p in (CONF / "preset").glob("*.yaml"))
    assert files == sorted(set(SEEDS) | OTHER_PRESETS)
    for name in files:
        assert (CONF / "preset" / f"{name}.yaml").read_text().startswith("# @package _global_\n"), name


@pytest.mark.parametrize("preset", sorted(SEEDS))
def test_preset_sets_the_whole_recipe(preset):
    raw = yaml.safe_load((CONF / "preset" / f"{preset}.yaml").read_text())
    missing = [f"{section}.{key}" for section, keys in RECIPE.items() for key in keys
               if key not in raw.get(section, {})]
    assert missing == []


@pytest.mark.parametrize("preset", sorted(SEEDS))
def test_preset_composes_into_valid_params_with_the_seed_recipe(preset):
    from cifarlab.models.names import model_names
    from cifarlab.config.params import parse_params

    params = parse_params(compose([f"preset={preset}"]))
    seed = SEEDS[preset]
    assert params.model.name in model_names()
    assert params.model.name == seed["model"]
    assert (params.train.batch_size, params.train.epochs) == (seed["batch_size"], seed["epochs"])
    assert params.report.target_accuracy == seed["target"]
    assert params.report.writeup_accuracy == seed["writeup"]
    assert params.report.preset == preset                 # what `dvc exp show` shows
    assert params.data.source == "cifar10"                # the real data and its held-out test split
    assert 1 <= params.train.max_at_epoch <= params.train.epochs


def test_presets_differ_only_where_their_recipes_do():
    base = compose()
    for preset in SEEDS:
        composed = compose([f"preset={preset}"])
        for section in base:
            if section not in RECIPE:
                assert composed[section] == base[section], (preset, section)


def test_assignment7_has_its_dropout():
    assert compose(["preset=assignment7"])["model"]["dropout"] > 0


def test_assignment8_does_not_reuse_the_loss_minimum_lr():
    # The seed took 0.69 at the range test's loss minimum and diverged; the preset asks lr_find,
    # whose rules never return the loss minimum.
    params = compose(["preset=assignment8"])
    assert params["train"]["max_lr"] == "find"
    assert params["lr_find"]["rule"] in RULES


def test_session11_evaluates_the_real_test_split():
    params = compose(["preset=session11"])
    assert params["data"]["source"] == "cifar10"   # evaluate checks 10,000 held-out test images for cifar10


def test_command_line_beats_the_preset():
    params = compose(["preset=assignment7", "train.epochs=2", "train.max_at_epoch=1", "train.max_lr=0.01"])
    assert (params["train"]["epochs"], params["train"]["max_lr"], params["model"]["name"]) == (2, 0.01, "a7_net")


def test_default_composition_is_the_committed_params_yaml():
    composed = compose_text()
    assert compose_text([f"preset={DEFAULT_PRESET}"]) == composed
    committed = (REPO / "params.yaml").read_text()
    assert yaml.safe_load(committed) == yaml.safe_load(composed), \
        "params.yaml differs from the composition of conf/: edit conf/, then run `python -m cifarlab compose`"
    assert uncommented(committed) == composed, \
        "params.yaml is not the composition's text: run `python -m cifarlab compose`"
    assert committed.startswith(PARAMS_HEADER)
    assert committed == params_text(CONF)


def test_compose_command_writes_and_checks_params_yaml(tmp_path):
    shutil.copytree(CONF, tmp_path / "conf")
    compose_cli = [sys.executable, "-m", "cifarlab", "compose"]
    result = run([*compose_cli, "--check"], tmp_path, check=False)
    assert result.returncode == 1 and "params.yaml is not the composition of conf/" in result.stderr
    run(compose_cli, tmp_path)
    assert (tmp_path / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    assert run([*compose_cli, "--check"], tmp_path).returncode == 0
    missing = run([*compose_cli, "--conf", "nowhere"], tmp_path, check=False)
    assert missing.returncode == 1 and "nowhere/config.yaml does not exist" in missing.stderr


# --- budgets: how much of a preset's run to spend (conf/budget/), orthogonal to the preset -----------

def budget_file(name: str) -> dict:
    return yaml.safe_load((CONF / "budget" / f"{name}.yaml").read_text()) or {}


def test_budget_files():
    assert {"full", "quick"} <= set(BUDGETS)
    for name in BUDGETS:
        assert (CONF / "budget" / f"{name}.yaml").read_text().startswith("# @package _global_\n"), name


@pytest.mark.parametrize("budget", BUDGETS)
def test_each_budget_records_its_own_name(budget):
    # `dvc exp show` tells a quick run from a full one by budget.name, and the file name is the
    # one place a budget is named: the value a composition records must be that name.
    assert compose([f"budget={budget}"])["budget"] == {"name": budget}


def test_full_budget_is_the_assignment_as_written():
    assert budget_file("full") == {}                       # it sets nothing
    for preset in SEEDS:
        assert compose([f"preset={preset}", "budget=full"]) == compose([f"preset={preset}"])


def test_an_unknown_budget_is_refused_by_the_composition():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="budget"):
        compose(["budget=quik"])


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


QUICK = flatten(budget_file("quick"))


def test_quick_budget_sets_only_what_costs_time():
    assert set(QUICK) == {"data.train_subset", "data.test_subset",
                          "lr_find.start_lr", "lr_find.end_lr", "lr_find.num_iter", "lr_find.smooth_f",
                          "lr_find.stop_rebound", "train.epochs", "train.max_at_epoch", "train.batch_size",
                          "evaluate.gradcam_size", "budget.name"}


@pytest.mark.parametrize("preset", sorted(SEEDS))
def test_quick_budget_with_each_preset(preset):
    from cifarlab.config.params import parse_params

    full, quick = compose([f"preset={preset}"]), compose([f"preset={preset}", "budget=quick"])
    changed = {key for key, value in flatten(quick).items() if flatten(full)[key] != value}
    assert changed <= set(QUICK)
    assert {key: flatten(quick)[key] for key in QUICK} == QUICK          # the budget wins over the preset
    for source in ("cifar10", "synthetic"):
        params = parse_params(compose([f"preset={preset}", "budget=quick", f"data.source={source}"]))
        # what the recipe keeps: model, optimizer, augmentation, schedule shape, target
        assert params.model.name == SEEDS[preset]["model"] and params.report.preset == preset
        assert params.report.target_accuracy == SEEDS[preset]["target"]
        assert (params.train.max_lr, params.optim.name) == (full["train"]["max_lr"], full["optim"]["name"])
        # what it cuts
        assert params.train.epochs < SEEDS[preset]["epochs"]
        assert 1 <= params.train.max_at_epoch < params.train.epochs      # OneCycle still rises, then falls
        assert params.lr_find.num_iter < full["lr_find"]["num_iter"]
        assert 0 < params.data.train_subset <= params.data.synthetic_train_size
        assert 0 < params.data.test_subset <= params.data.synthetic_test_size
        assert params.train.batch_size * 10 <= params.data.train_subset    # at least 10 steps per epoch
        assert params.budget.name == "quick"


def test_quick_range_test_can_read_a_minimum_from_its_16th_point():
    """The rules skip the first SKIP_START points and need MIN_WINDOW below the loss minimum: the
    range test's LR at that point must sit below the lowest loss minimum measured at the quick batch
    (5e-4, assignment 8's raw losses on the synthetic set), and its last LR above the highest (8e-2,
    assignment 7)."""
    from cifarlab.config.lr_rules import MIN_WINDOW, SKIP_START

    start, end, points = QUICK["lr_find.start_lr"], QUICK["lr_find.end_lr"], QUICK["lr_find.num_iter"]
    first_readable_minimum = start * (end / start) ** ((SKIP_START + MIN_WINDOW) / (points - 1))
    assert first_readable_minimum < 5e-4 / 2 and end > 8e-2 * 2


def test_every_key_in_params_yaml_is_commented():
    missing = [line for line in body((REPO / "params.yaml").read_text()).splitlines()
               if line.startswith(" ") and " # " not in line]
    assert missing == [], "keys without a comment in conf/config.yaml"


# --- the README's preset table -----------------------------------------------------------------------

def test_readme_preset_table_is_generated_from_the_presets(monkeypatch):
    from cifarlab.config import preset_table

    monkeypatch.chdir(REPO)
    assert preset_table.main(["--check"]) == 0, "run `python -m cifarlab preset-table`"


def test_preset_table_follows_the_preset_files(tmp_path):
    from cifarlab.config import preset_table

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    fast = conf / "preset" / "fast.yaml"
    fast.write_text(fast.read_text().replace("  epochs: 12 ", "  epochs: 14 "))
    rows = {line.split(" | ")[0]: line for line in preset_table.table(conf).splitlines()}
    assert "| 1024, 14 |" in rows["| `fast`"]
    assert rows["| `assignment10` (default)"].startswith("| `assignment10` (default) | `custom_resnet` (6,573,130) |")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{preset_table.BEGIN}\nold table\n{preset_table.END}\nrest\n")
    assert preset_table.main(["--check", "--readme", str(readme), "--conf", str(conf)]) == 1
    assert preset_table.main(["--readme", str(readme), "--conf", str(conf)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\nrest\n") and "| 1024, 14 |" in text
