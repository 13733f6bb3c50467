"""dvc.yaml declares, for every stage, the library modules its script imports (so a code change
reruns exactly the stages it can affect) and only params keys that exist."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifarlab import dvcfile
from cifarlab.config.params import Params, parse_params
from cifarlab.tools import codedeps
from conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def declared(stage: dict) -> list[str]:
    return dvcfile.paths(stage, "deps")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_code_deps_are_the_generated_ones(name):
    """Every file the script imports, transitively, and nothing else: `python -m cifarlab codedeps` wrote them."""
    code = [dep for dep in declared(STAGES[name]) if dep.startswith(("stages/", "src/"))]
    assert code == codedeps.code_deps(name, REPO)


def test_codedeps_check_passes_on_the_committed_dvc_yaml():
    result = subprocess.run([sys.executable, "-m", "cifarlab", "codedeps", "--check"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def _library(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_code_deps_follow_imports_transitively_per_file(tmp_path):
    """Each import is the one file it names (not its whole wing); a module that imports its folder's
    modules by name (the model registry) stands for that folder; package markers are not deps."""
    root = _library(tmp_path, {
        "stages/fit.py": "import _src\nfrom cifarlab.wing import a\n\ndef main():\n    from cifarlab.wing.b import f\n",
        "src/cifarlab/__init__.py": "", "src/cifarlab/wing/__init__.py": "",
        "src/cifarlab/wing/a.py": "import numpy\nfrom cifarlab.models.registry import create\n",
        "src/cifarlab/wing/b.py": "from cifarlab.c import g\n", "src/cifarlab/c.py": "",
        "src/cifarlab/wing/unused.py": "",
        "src/cifarlab/models/__init__.py": "", "src/cifarlab/models/names.py": "NAMES = ('small',)\n",
        "src/cifarlab/models/registry.py": "import importlib\nfrom cifarlab.models.names import NAMES\n"
                                           "def create(name):\n    return importlib.import_module(name)\n",
        "src/cifarlab/models/small.py": "from cifarlab.models.registry import create\n",
        "src/cifarlab/config/__init__.py": "", "src/cifarlab/config/params.py": "from cifarlab.models.names import NAMES\n",
        "stages/load.py": "from cifarlab.config.params import check\n",
    })
    assert codedeps.code_deps("fit", root) == ["stages/fit.py", "stages/_src.py", "src/cifarlab/c.py", "src/cifarlab/models",
                                               "src/cifarlab/wing/a.py", "src/cifarlab/wing/b.py"]
    # params.py reads the model names only: it depends on that file, not on the networks
    assert codedeps.code_deps("load", root) == ["stages/load.py", "stages/_src.py", "src/cifarlab/config/params.py",
                                                "src/cifarlab/models/names.py"]


# Library files each stage imports (the models folder counts once): what the wings were split for.
# A stage that suddenly imports many more files reruns on edits it cannot be affected by.
LIBRARY_FILES = {"download": 11, "lr_find": 20, "max_lr": 10, "train": 29, "evaluate": 24, "report": 16}


@pytest.mark.parametrize("name", sorted(LIBRARY_FILES))
def test_each_stage_depends_on_the_files_it_imports_only(name):
    library = [dep for dep in codedeps.code_deps(name, REPO) if dep.startswith("src/")]
    assert len(library) <= LIBRARY_FILES[name], library
    if name != "report":
        assert not any(dep.startswith("src/cifarlab/pipeline/report") for dep in library), library
    if name in ("download", "max_lr"):
        assert "src/cifarlab/models" not in library   # params load without the networks


def test_editing_the_report_code_reruns_only_the_report():
    report_code = [path.relative_to(REPO).as_posix() for path in (REPO / "src/cifarlab/pipeline/report").glob("*.py")
                   if path.name != "__init__.py"]
    assert report_code
    for path in report_code:
        assert {name for name in STAGES if path in declared(STAGES[name])} == {"report"}, path


def test_codedeps_rewrites_stale_code_deps_and_keeps_data_deps_and_comments(tmp_path):
    root = _library(tmp_path, {"stages/fit.py": "from cifarlab import a\n", "src/cifarlab/__init__.py": "",
                               "src/cifarlab/a.py": "", "src/cifarlab/old.py": ""})
    (root / "dvc.yaml").write_text("stages:\n  fit:   # the stage\n    cmd: python stages/fit.py\n    deps:\n"
                                   "      - stages/fit.py\n      - data   # the data\n      - src/cifarlab/old.py\n")
    assert list(codedeps.stale_stages(root)) == ["fit"]
    assert codedeps.write(root) == ["fit"]
    text = (root / "dvc.yaml").read_text()
    assert "# the stage" in text and "# the data" in text
    assert declared(yaml.safe_load(text)["stages"]["fit"]) == ["stages/fit.py", "stages/_src.py", "data",
                                                               "src/cifarlab/a.py"]
    assert codedeps.stale_stages(root) == {}


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
                or (name, key) == ("lr_find", "train.max_lr") \
                or not key.startswith("train"), (name, key)   # lr_find: only whether it is `find` (a number: no-op)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_runs_its_own_checkouts_code(name):
    """Each script imports stages/_src.py before any cifarlab module and depends on it, so a stage
    run in another copy of the repo (a queued experiment, a second clone) uses that copy's src/."""
    script = REPO / "stages" / f"{name}.py"
    imports = [node for node in ast.parse(script.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert isinstance(imports[0], ast.Import) and imports[0].names[0].name == "_src", name
    assert "stages/_src.py" in declared(STAGES[name])


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
    outs = dvcfile.entries(STAGES[name], ["outs"])
    assert [path for path, flags in outs if flags.get("persist")] == []
    assert [path for path, flags in outs if flags.get("cache") is False] == []


def test_declared_metrics_are_only_what_a_user_compares():
    """`dvc exp show` columns: the stage-level metrics files, nothing at top level."""
    top = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert "metrics" not in top
    declared = [path for stage in STAGES.values() for path in dvcfile.paths(stage, "metrics")]
    assert sorted(declared) == ["metrics/test.json", "metrics/training.json"]


def test_cached_outputs_are_git_ignored_by_the_committed_gitignore():
    """Every DVC-cached out is covered by a line of the root .gitignore that DVC never writes or
    removes itself ("/data" is DVC's spelling; "/data/" is ours)."""
    import subprocess

    lines = set((REPO / ".gitignore").read_text().splitlines())
    for stage in STAGES.values():
        for path, flags in dvcfile.entries(stage, ["outs"]):
            if flags.get("cache", True):
                if "/" not in path:      # DVC's own line for a top-level out, which it may delete
                    assert f"/{path}" not in lines
                result = subprocess.run(["git", "check-ignore", "--no-index", "-q", f"{path}/x" if "." not in
                                         Path(path).name else path], cwd=REPO)
                assert result.returncode == 0, f"{path} is not git-ignored"
