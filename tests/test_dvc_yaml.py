"""dvc.yaml declares, for every stage, the library modules its script imports (so a code change
reruns exactly the stages it can affect) and only params keys that exist."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from cifarlab.params import Params, parse_params
from conftest import REPO

PACKAGE = REPO / "src" / "cifarlab"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "cifarlab":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


# params.py looks up the model registry only to validate `model.name`; no stage output depends on it.
VALIDATION_ONLY = {(PACKAGE / "params.py", "cifarlab.models")}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if (path, name) not in VALIDATION_ONLY}


def library_files(script: Path) -> set[Path]:
    """Every cifarlab source file the script imports, transitively."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in imported_modules(todo.pop()):
            found = module_file(name)
            if found and found not in seen:
                seen.add(found)
                todo.append(found)
    return seen


def declared(stage: dict) -> list[Path]:
    return [REPO / (next(iter(d)) if isinstance(d, dict) else d) for d in stage.get("deps", [])]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_every_module_it_imports(name):
    stage = STAGES[name]
    script = REPO / "stages" / f"{name}.py"
    deps = declared(stage)
    assert script in deps
    needed = library_files(script) - {PACKAGE / "__init__.py"}   # the package marker holds only a version
    missing = sorted(str(f.relative_to(REPO)) for f in needed if not any(f == d or d in f.parents for d in deps))
    assert missing == [], f"stage {name} imports these but does not list them in deps"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_params_exist(name, default_params):
    parse_params(default_params)
    for key in STAGES[name].get("params", []):
        section, _, field = key.partition(".")
        assert section in Params.__dataclass_fields__, key
        if field:
            assert field in default_params[section], key


def test_changing_train_does_not_touch_download_or_lr_find():
    for name in ("download", "lr_find"):
        for key in STAGES[name].get("params", []):
            assert key == "train.batch_size" or key == "train.seed" or key == "train.div_factor" \
                or not key.startswith("train"), (name, key)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_runs_its_own_checkouts_code(name):
    """Each script imports stages/_src.py before any cifarlab module and depends on it, so a stage
    run in another copy of the repo (a queued experiment, a second clone) uses that copy's src/."""
    script = REPO / "stages" / f"{name}.py"
    imports = [node for node in ast.parse(script.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert isinstance(imports[0], ast.Import) and imports[0].names[0].name == "_src", name
    assert REPO / "stages" / "_src.py" in declared(STAGES[name])


def test_a_copy_of_the_repo_imports_its_own_src(tmp_path, tiny_params):
    import shutil

    from conftest import run, write_params

    shutil.copytree(REPO / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    with open(tmp_path / "src" / "cifarlab" / "__init__.py", "a") as init:
        init.write("\nprint('cifarlab imported from', __file__)\n")
    write_params(tmp_path, tiny_params)
    result = run(["python", "stages/download.py"], tmp_path)
    assert f"cifarlab imported from {tmp_path / 'src' / 'cifarlab' / '__init__.py'}" in result.stdout


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_can_be_restored_from_the_run_cache(name):
    """DVC saves a stage to its run-cache only if no out is `persist` and every `cache: false` out
    is a stage-level metric or plot (dvc/stage/cache.py `_can_hash`, dvc/stage/__init__.py `run`)."""
    outs = [next(iter(o.items())) if isinstance(o, dict) else (o, {}) for o in STAGES[name].get("outs", [])]
    assert [path for path, flags in outs if flags.get("persist")] == []
    assert [path for path, flags in outs if flags.get("cache") is False] == []


def test_declared_metrics_are_only_what_a_user_compares():
    """`dvc exp show` columns: the stage-level metrics files, nothing at top level."""
    top = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert "metrics" not in top
    declared = [next(iter(m)) if isinstance(m, dict) else m
                for stage in STAGES.values() for m in stage.get("metrics", [])]
    assert sorted(declared) == ["metrics/test.json", "metrics/training.json"]


def test_cached_outputs_are_git_ignored_by_the_committed_gitignore():
    """Every DVC-cached out is covered by a line of the root .gitignore that DVC never writes or
    removes itself ("/data" is DVC's spelling; "/data/" is ours)."""
    import subprocess

    lines = set((REPO / ".gitignore").read_text().splitlines())
    for stage in STAGES.values():
        for out in stage.get("outs", []):
            path, flags = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            if flags.get("cache", True):
                if "/" not in path:      # DVC's own line for a top-level out, which it may delete
                    assert f"/{path}" not in lines
                result = subprocess.run(["git", "check-ignore", "--no-index", "-q", f"{path}/x" if "." not in
                                         Path(path).name else path], cwd=REPO)
                assert result.returncode == 0, f"{path} is not git-ignored"
