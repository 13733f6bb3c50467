"""notebooks/quickstart.ipynb: its first cell holds the choices, and it runs top to bottom.

The end-to-end test executes the committed notebook with nbclient, as Jupyter would, in a scratch
git copy of the repo on the CPU, with two choices changed the way papermill injects parameters (a
cell after the first): the synthetic source and the quick budget. It opens inside the copy, so it
clones nothing; it must find every requirement installed (so it installs nothing into the test's
environment), and it starts with no git identity, as a fresh Colab runtime does.
"""

from __future__ import annotations

import ast
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from conftest import COPIED, REPO, composed, run

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
CHOICES = {"PRESET", "COMPARE_WITH", "BUDGET", "DATA", "REPO_URL"}


def choices(cell_source: str) -> dict:
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell_source).body
            if isinstance(node, ast.Assign)}


def test_first_cell_holds_the_choices_and_they_are_allowed():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    first = notebook.cells[0]
    assert first.cell_type == "code"
    values = choices(first.source)
    assert set(values) == CHOICES
    presets = {path.stem for path in (REPO / "conf" / "preset").glob("*.yaml")}
    budgets = {path.stem for path in (REPO / "conf" / "budget").glob("*.yaml")}
    assert {values["PRESET"], values["COMPARE_WITH"]} <= presets and values["PRESET"] != values["COMPARE_WITH"]
    assert values["BUDGET"] in budgets and values["DATA"] in ("cifar10", "synthetic")


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in notebook.cells if cell.cell_type == "code")


def scratch_repo(tmp_path: Path) -> Path:
    """The repo's pipeline, requirements and notebook in a new git repo with one commit."""
    work = tmp_path / "repo"
    for name in (*COPIED, "requirements.txt", "notebooks"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info",
                                                                                ".ipynb_checkpoints"))
        else:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)
    run(["git", "init", "-q"], work)
    run(["git", "add", "-A"], work)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "scratch"], work)
    return work


def outputs_of(cell) -> tuple[str, dict]:
    """A code cell's printed text, and its rich outputs by MIME type (lists of data)."""
    text, rich = "", {}
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            text += out.text
        elif out.output_type in ("display_data", "execute_result"):
            for mime, data in out.data.items():
                rich.setdefault(mime, []).append(data)
    return text, rich


@pytest.mark.e2e
def test_quickstart_runs_top_to_bottom_on_the_cpu(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    from conftest import tool_env

    work = scratch_repo(tmp_path)
    for key, value in tool_env().items():          # the kernel's `python` and `dvc` are this environment's
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")      # tiny work on a shared 2-core CPU (see test_presets)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-gitconfig"))   # no identity, as on Colab
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")

    notebook = nbformat.read(work / "notebooks" / "quickstart.ipynb", as_version=4)
    defaults = choices(notebook.cells[0].source)
    injected = nbformat.v4.new_code_cell('DATA = "synthetic"\nBUDGET = "quick"')
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(1, injected)

    started = time.perf_counter()
    NotebookClient(notebook, timeout=1500, kernel_name="python3",
                   resources={"metadata": {"path": str(work / "notebooks")}}).execute()
    print(f"quickstart notebook: {time.perf_counter() - started:.0f} s")

    cells = [outputs_of(cell) for cell in notebook.cells if cell.cell_type == "code"]
    text = "".join(printed for printed, _ in cells)
    assert f"repository: {work}" in text                   # found the repo around it: no clone
    assert "every requirement is installed" in text        # installed nothing
    assert run(["git", "config", "--local", "user.email"], work).stdout.strip() == "notebook@example.com"

    names = [f"{defaults[key]}-quick-synthetic" for key in ("PRESET", "COMPARE_WITH")]
    markdown = "".join("".join(data) for _, rich in cells for data in rich.get("text/markdown", []))
    assert all(name in markdown for name in names)         # `dvc exp show` lists both experiments
    assert "quick" in markdown and "synthetic" in markdown   # with their budget and data source
    images = [data for _, rich in cells for data in rich.get("image/png", [])]
    assert len(images) == 2                                # training curves and confusion matrix
    title = composed([f"preset={defaults['PRESET']}"])["report"]["title"]
    shown_report = next(data for _, rich in cells for data in rich.get("text/markdown", []) if title in data)
    assert "data:image/png;base64," in shown_report and "](figures/" not in shown_report   # figures inlined

    page = work / ".cache" / "plots_diff" / "index.html"
    assert f"the comparison page: {page}" in text
    html = page.read_text()
    assert all(f'"{name}"' in html for name in names) and "Accuracy per epoch" in html
    frames = [data for _, rich in cells for data in rich.get("text/html", []) if "<iframe srcdoc=" in data]
    assert len(frames) == 1 and 'src=&quot;data:image/png;base64,' in frames[0]   # the page, its images inlined
    assert run(["git", "status", "--porcelain", "--", ".cache"], work).stdout == ""   # not part of any experiment


def test_notebook_installs_only_the_runtime_requirements():
    """The notebook installs what is missing above requirements.txt's "# Tests only" line: on Colab,
    upgrading ipykernel or nbclient under the running kernel could break the session."""
    lines = (REPO / "requirements.txt").read_text().splitlines()
    marker = next(i for i, line in enumerate(lines) if line.startswith("# Tests only"))
    tests_only = {line.split(">=")[0] for line in lines[marker + 1:] if line and not line.startswith("-")}
    assert {"pytest", "nbclient", "nbformat", "ipykernel"} <= tests_only
    runtime = {line.split(">=")[0] for line in lines[:marker] if line and not line.startswith("#")}
    assert {"torch", "dvc", "dvclive"} <= runtime
    source = "".join(cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells)
    assert 'line.startswith("# Tests only")' in source
