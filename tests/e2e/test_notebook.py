"""notebooks/quickstart.ipynb: its first cell holds the choices, and it runs top to bottom.

The end-to-end test executes the committed notebook with nbclient, as Jupyter would, in a scratch
git copy of the repo on the CPU, with two choices changed the way papermill injects parameters (a
cell after the first): the synthetic source and the quick budget. It opens inside the copy, so it
clones nothing; it must find every requirement installed (so it installs nothing into the test's
environment), and it starts with no git identity, as a fresh Colab runtime does.
"""

from __future__ import annotations

import ast
import inspect
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
    preset_line = next(line for line in first.source.splitlines() if line.startswith("PRESET ="))
    assert all(name in preset_line.split("#", 1)[1] for name in presets)      # the comment names every preset


def test_setup_cell_is_short_its_helpers_live_in_the_library():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code[1]) < 1000 and "from cifarlab.tools import notebook" in code[1]
    assert all(len(source) < 200 for source in code[2:])


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


def _execute_quickstart(folder: Path) -> tuple[Path, dict, list[tuple[str, str, dict]]]:
    from nbclient import NotebookClient

    from conftest import tool_env

    work = scratch_repo(folder)
    env = tool_env() | {                        # the kernel's `python` and `dvc` are this environment's
        "OMP_NUM_THREADS": "1",                  # tiny work on a shared 2-core CPU
        "GIT_CONFIG_GLOBAL": str(folder / "no-gitconfig"), "GIT_CONFIG_NOSYSTEM": "1"}   # no identity, as on Colab
    notebook = nbformat.read(work / "notebooks" / "quickstart.ipynb", as_version=4)
    defaults = choices(notebook.cells[0].source)
    injected = nbformat.v4.new_code_cell('DATA = "synthetic"\nBUDGET = "quick"')
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(1, injected)
    with pytest.MonkeyPatch.context() as patch:  # the kernel nbclient starts inherits this environment
        for key, value in env.items():
            patch.setenv(key, value)
        started = time.perf_counter()
        NotebookClient(notebook, timeout=1500, kernel_name="python3",
                       resources={"metadata": {"path": str(work / "notebooks")}}).execute()
        print(f"quickstart notebook: {time.perf_counter() - started:.0f} s")
    return work, defaults, [(cell.source, *outputs_of(cell)) for cell in notebook.cells if cell.cell_type == "code"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The committed notebook executed top to bottom with the synthetic source and the quick budget
    (its two assignments as two quick experiments): (the scratch repo, the notebook's own choices,
    [(source, printed text, rich outputs) of each code cell]). The quick-budget test below reads
    the second assignment's run instead of running one more."""
    return _execute_quickstart(tmp_path_factory.mktemp("quickstart"))


@pytest.mark.e2e
def test_quickstart_runs_top_to_bottom_on_the_cpu(quickstart):
    work, defaults, executed = quickstart
    cells = [(text, rich) for _, text, rich in executed]
    text = "".join(printed for printed, _ in cells)
    assert f"repository: {work}" in text                   # found the repo around it: no clone
    assert "every requirement is installed" in text        # installed nothing
    assert run(["git", "config", "--local", "user.email"], work).stdout.strip() == "notebook@example.com"

    names = [f"{defaults[key]}-quick-synthetic" for key in ("PRESET", "COMPARE_WITH")]
    markdown = "".join("".join(data) for _, rich in cells for data in rich.get("text/markdown", []))
    assert all(name in markdown for name in names)         # the experiments table lists both experiments
    assert "quick" in markdown and "synthetic" in markdown   # with their budget and data source
    bars = [line for line in text.splitlines() if "it/s]" in line or "s/it]" in line]
    assert "\r" not in text and len(bars) <= 30, bars     # each progress bar once, not one line per update
    images = [data for _, rich in cells for data in rich.get("image/png", [])]
    assert len(images) == 2                                # training curves and confusion matrix
    title = composed([f"preset={defaults['PRESET']}"])["report"]["title"]
    shown_report = next(data for _, rich in cells for data in rich.get("text/markdown", []) if title in data)
    assert "](figures/" not in shown_report                 # any figure of the first screen inlined
    assert "*The rest of the report (" in shown_report and "](../reports/report.md)" in shown_report
    assert len(shown_report) < len((work / "reports" / "report.md").read_text())   # its first screen only

    page = work / ".cache" / "plots_diff" / "index.html"
    assert f"the comparison page: {page}" in text
    html = page.read_text()
    assert all(f'"{name}"' in html for name in names) and "Accuracy per epoch" in html
    frames = [data for _, rich in cells for data in rich.get("text/html", []) if "<iframe srcdoc=" in data]
    assert len(frames) == 1 and 'src=&quot;data:image/png;base64,' in frames[0]   # the page, its images inlined
    assert run(["git", "status", "--porcelain", "--", ".cache"], work).stdout == ""   # not part of any experiment


def test_notebook_installs_only_the_runtime_requirements():
    """The notebook installs what requirements.txt lists and is missing; the test toolchain is in
    requirements-dev.txt, which it never reads: on Colab, upgrading ipykernel or nbclient under the
    running kernel could break the session."""
    def names(path):
        return {line.split(">=")[0].split("#")[0].strip() for line in (REPO / path).read_text().splitlines()
                if line.strip() and not line.startswith(("#", "-"))}
    assert {"torch", "dvc", "dvclive"} <= names("requirements.txt")
    assert not {"pytest", "nbclient", "nbformat", "ipykernel"} & names("requirements.txt")
    assert {"pytest", "nbclient", "nbformat", "ipykernel"} <= names("requirements-dev.txt")
    assert "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text().splitlines()
    from cifarlab.tools import notebook
    assert inspect.signature(notebook.unmet).parameters["requirements"].default == "requirements.txt"


@pytest.mark.e2e
def test_quick_budget_runs_a_preset_end_to_end(quickstart, tmp_path):
    """The notebook's second assignment ran as `dvc exp run -S preset=... -S budget=quick -S
    data.source=synthetic`: the preset's recipe with the quick budget's cuts, on class-balanced subsets
    taken when the stages load data/ (which keeps the whole split, so changing a subset never reruns
    download)."""
    import json
    import math

    import yaml

    from conftest import copy_repo, exp_rows, params_in, ran_stages, write_params
    from test_presets import QUICK, SEEDS

    work, defaults, executed = quickstart
    preset = defaults["COMPARE_WITH"]
    name = f"{preset}-quick-synthetic"
    [first] = [text for source, text, _ in executed if "run_assignment(PRESET" in source]
    [output] = [text for source, text, _ in executed if "run_assignment(COMPARE_WITH" in source]
    stages = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert ran_stages(first) == stages                                # a fresh repo: every stage
    assert ran_stages(output) == stages - {"download"}                # the same synthetic data: not made again

    params = exp_rows(json.loads(run(["dvc", "exp", "show", "--json"], work).stdout))[name]["params"]
    params = params["params.yaml"]["data"]
    assert (params["report"]["preset"], params["budget"]["name"]) == (preset, "quick")
    assert params["model"]["name"] == SEEDS[preset]["model"]
    for key, value in QUICK.items():
        section, field = key.split(".")
        assert params[section][field] == value, key

    train_size, test_size = QUICK["data.train_subset"], QUICK["data.test_subset"]
    meta = json.loads((work / "data" / "meta.json").read_text())
    assert (meta["train_size"], meta["test_size"]) == (5000, 1000)          # data/ holds the whole synthetic split
    assert f"on {train_size} synthetic images" in output                     # train saw the subset
    evaluation = json.loads((work / "metrics" / "evaluate.json").read_text())   # the workspace holds this run
    assert evaluation["test_images"] == test_size                             # evaluate measured the test subset
    assert sum(1 for _ in (work / "plots" / "confusion.csv").open()) == test_size + 1
    lr_find = json.loads((work / "metrics" / "lr_find.json").read_text())
    assert lr_find["iterations"] <= QUICK["lr_find.num_iter"] and lr_find["max_lr"] < lr_find["loss_minimum_lr"]
    steps = (work / "plots" / "lr_schedule.csv").read_text().splitlines()[1:]
    assert len(steps) == QUICK["train.epochs"] * math.ceil(train_size / QUICK["train.batch_size"])

    # Another test subset: DVC would rerun train and evaluate (and so report), no new download, no new range test.
    copy = copy_repo(work, tmp_path / "repo")
    smaller = params_in(copy)
    smaller["data"]["test_subset"] = 50
    write_params(copy, smaller)
    changed = json.loads(run(["dvc", "status", "--json"], copy).stdout)
    assert set(changed) == {"train", "evaluate"}, changed
    assert all({"changed deps": {"params.yaml": {"data.test_subset": "modified"}}} in changed[stage]
               for stage in changed), changed
