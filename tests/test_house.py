"""The library's shape holds: wings import only downward, no circles, no module over 400 lines, the
train module's functions short, empty wing markers, and the front door lists every tool."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import house  # noqa: E402


def test_the_house_rules_hold():
    assert house.problems() == []


def test_the_house_check_names_a_back_import(tmp_path):
    lib = tmp_path / "cifarlab"
    for wing in ("data", "engine"):
        (lib / wing).mkdir(parents=True)
        (lib / wing / "__init__.py").write_text("")
    (lib / "__init__.py").write_text("")
    (lib / "data" / "loaders.py").write_text("from cifarlab.engine.runtime import Runtime\n")
    (lib / "engine" / "runtime.py").write_text("from cifarlab.data import loaders\n")
    (lib / "engine" / "__init__.py").write_text("x = 1\n")
    found = house.problems(tmp_path, function_limits={})
    assert "cifarlab.data.loaders imports cifarlab.engine.runtime, a wing above it" in found
    assert "import circle: cifarlab.data.loaders -> cifarlab.engine.runtime" in found
    assert "cifarlab/engine/__init__.py is not empty (a wing's marker holds no code)" in found


def test_the_models_wing_imports_nothing_else_of_the_library():
    edges = house.graph()
    assert {target for name, targets in edges.items() if name.startswith("cifarlab.models.")
            for target in targets if not target.startswith("cifarlab.models.")} == set()


def test_the_front_door_runs_every_tool():
    from cifarlab.__main__ import TOOLS

    listed = subprocess.run([sys.executable, "-m", "cifarlab"], cwd=REPO, capture_output=True, text=True)
    assert listed.returncode == 2 and all(f"  {tool}" in listed.stdout for tool in TOOLS)
    for tool in TOOLS:
        helped = subprocess.run([sys.executable, "-m", "cifarlab", tool, "--help"], cwd=REPO, capture_output=True,
                                text=True)
        assert helped.returncode == 0 and f"python -m cifarlab {tool}" in helped.stdout, (tool, helped.stderr)
    unknown = subprocess.run([sys.executable, "-m", "cifarlab", "trian"], cwd=REPO, capture_output=True, text=True)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == f"python -m cifarlab: unknown tool 'trian'; allowed: {', '.join(TOOLS)}"
