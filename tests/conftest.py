"""Shared fixtures and helpers (the one module tests import helpers from): the repo's params with
tiny synthetic settings, a runner for stage scripts, and temporary git + DVC copies of the pipeline."""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

import pytest
import yaml
from filelock import FileLock

import stage_fork
import stage_server

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Ctrl-C as in a terminal. A pytest started in the background of a script (`pytest &`, nohup)
    inherits SIGINT ignored, and every process the tests start would inherit that too (Python keeps
    an ignored SIGINT ignored), so the Ctrl-C tests could not reach a trainer. Catching it here gives
    the children the default disposition again."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # Under pytest-xdist each worker (and every process its tests start) gets its share of the cores:
    # two workers each running torch on every core spin against each other and run several times slower.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    """The test files with end-to-end tests (mark `e2e`) first, the longest runs, then those that run
    stage scripts (fixture `stage_dir`), then the rest; among equals, the files with most tests first;
    each file's tests in their order. pytest-xdist hands the workers whole files in this
    order (`--dist loadfile --no-loadscope-reorder`), so the short files fill in at the end instead of
    one worker finishing a long pipeline run alone."""
    rank, count = {}, {}
    for item in items:
        count[item.path] = count.get(item.path, 0) + 1
        starts_stages = 0 if item.get_closest_marker("e2e") else 1 if "stage_dir" in item.fixturenames else 2
        rank[item.path] = min(rank.get(item.path, 2), starts_stages)
    items.sort(key=lambda item: (rank[item.path], -count[item.path]))


# Small enough for a 2-core CPU, big enough that a network learns the synthetic set. The stage
# settings only: a preset's own network stays unless a test adds TINY_NET.
TINY = {
    "data": {"source": "synthetic", "synthetic_train_size": 512, "synthetic_test_size": 200},
    "lr_find": {"start_lr": 1.0e-5, "num_iter": 30, "end_lr": 1.0},
    "train": {"epochs": 3, "batch_size": 32, "max_at_epoch": 1, "max_lr": 0.003},
    "evaluate": {"batch_size": 200, "gallery_size": 10},
}

# The network the tiny stage runs train: assignment 7's (467k parameters), a fraction of the default
# network's cost per step, since these runs check the stages, not the network (the default network
# runs the pipeline in the preset runs, and each network is checked against its seed in test_models.py).
TINY_NET = {"model": {"name": "a7_net"}}


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@functools.lru_cache(maxsize=None)
def _composed_text(overrides: tuple[str, ...]) -> str:
    from cifarlab.config.compose import compose_text

    return compose_text(list(overrides), REPO / "conf")


def composed_text(overrides: list[str] = ()) -> str:
    """params.yaml as `dvc exp run -S <overrides>` writes it from this checkout's conf/ (composed once
    per session and overrides: conf/ does not change while the tests run)."""
    return _composed_text(tuple(overrides))


def composed(overrides: list[str] = ()) -> dict:
    """The params `dvc exp run -S <overrides>` would run, as a fresh dict. With no overrides, the default
    preset's: what the committed params.yaml holds (test_presets checks that), whatever the last
    `dvc exp run` left in this checkout's params.yaml."""
    return yaml.safe_load(composed_text(overrides))


@pytest.fixture
def default_params() -> dict:
    return composed()


def composed_tiny() -> dict:
    """The default preset's params with the TINY settings and TINY_NET: what `tiny_params` and
    `stage_dir` hold."""
    return merge(merge(composed(), TINY), TINY_NET)


@pytest.fixture
def tiny_params() -> dict:
    return composed_tiny()


def tool_env() -> dict:
    """Environment in which `python` and `dvc` are this interpreter's, with no network use by DVC.
    Unless the test module is marked `real_stage_processes`, the stages DVC starts run forked from
    this worker's stage server (tests/stage_server.py)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if _forked_stages["on"]:
        client, address = _stage_server()
        env["PATH"] = client + os.pathsep + env["PATH"]
        env[stage_server.SOCKET_ENV] = address
    return env


_forked_stages = {"on": True}


@functools.lru_cache(maxsize=None)
def _stage_server() -> tuple[str, str]:
    """This process's stage server, started on first use: (the client's folder, the socket). It ends
    when this process does (it watches its parent)."""
    folder = tempfile.mkdtemp(prefix="stage-server-")
    address = os.path.join(folder, "socket")
    server = subprocess.Popen([sys.executable, str(Path(stage_server.__file__)), address], start_new_session=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(address):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the stage server did not start (exit {server.poll()})")
        time.sleep(0.05)
    atexit.register(shutil.rmtree, folder, True)       # registered first, so it runs after the server is gone
    atexit.register(server.wait, 10)
    atexit.register(server.terminate)
    return stage_server.write_client(os.path.join(folder, "bin")), address


@contextlib.contextmanager
def forked_stages():
    """Within it, DVC's stages run forked from the stage server even in a `real_stage_processes`
    module (for a run that is only a reference, never signalled)."""
    before, _forked_stages["on"] = _forked_stages["on"], True
    try:
        yield
    finally:
        _forked_stages["on"] = before


@pytest.fixture(scope="module", autouse=True)
def _stage_processes(request):
    """Stages as real subprocesses of DVC in modules marked `real_stage_processes`, forked elsewhere."""
    _forked_stages["on"] = request.node.get_closest_marker("real_stage_processes") is None
    yield
    _forked_stages["on"] = True


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


class ScriptProcess:
    """A stage script started by `start_script`: the part of subprocess.Popen the tests use (pid, poll,
    wait, send_signal, communicate, returncode), with the output read once it has ended."""

    def __init__(self, process: multiprocessing.process.BaseProcess, stdout: Path, stderr: Path, args: list[str]):
        self._process, self._files, self.args = process, (stdout, stderr), args
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        out, err = (path.read_text(errors="replace") for path in self._files)
        for path in self._files:
            path.unlink(missing_ok=True)
        return out, err


def start_script(work: Path, script: str, *args: str) -> ScriptProcess:
    """`python script args...` in `work` with `tool_env()`, started as `tests/stage_fork.py` says: forked
    from a process that has imported torch and the stages' other libraries once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(stage_fork.PRELOAD)
    handle, stdout = tempfile.mkstemp(prefix="stdout-", suffix=".txt")
    os.close(handle)
    handle, stderr = tempfile.mkstemp(prefix="stderr-", suffix=".txt")
    os.close(handle)
    process = context.Process(target=stage_fork.child, args=(script, str(work), tool_env(), stdout, stderr, list(args)))
    process.start()
    return ScriptProcess(process, Path(stdout), Path(stderr), ["python", script, *args])


def run_script(work: Path, script: str, *args: str, check: bool = True, timeout: float = 900
               ) -> subprocess.CompletedProcess:
    """`run(["python", script, *args], work, check)` for a stage script, forked (`start_script`)."""
    process = start_script(work, script, *args)
    try:
        stdout, stderr = process.communicate(timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"python {script} failed ({result.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}")
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
    copy_stages(work)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(REPO / "dvc.yaml", work / "dvc.yaml")


def make_stage_dir(work: Path, params: dict) -> Path:
    """`work` with the stage scripts, `params` and their synthetic dataset written: stages run in it as
    `python stages/<name>.py`, exactly as `dvc repro` runs them."""
    from cifarlab.data.sources import make_synthetic
    from cifarlab.data.storage import save_dataset

    copy_code(work)
    write_params(work, params)
    data = params["data"]
    save_dataset(make_synthetic(data["synthetic_train_size"], data["synthetic_test_size"], data["synthetic_seed"]),
                 work / "data")
    return work


@pytest.fixture
def stage_dir(tmp_path, tiny_params):
    """A stage working directory (`make_stage_dir`) with the tiny params."""
    return make_stage_dir(tmp_path / "work", tiny_params)


# The tiny run's evaluate settings: sizes that differ from the defaults and from each other, so
# the outputs must follow params; TTA on, so its figures appear beside the plain ones.
TINY_RUN_EVALUATE = {"gallery_size": 6, "gradcam_size": 4, "tta_hflip": True, "tta_translate": True}


Built = TypeVar("Built")


def built_once(tmp_path_factory, name: str, build: Callable[[Path], Built]) -> Built:
    """`build(folder)` run once per test session, however many pytest-xdist workers ask for it: the
    first to ask builds it under a file lock in the session's temporary folder, which every worker
    shares, and the others wait for it and read its (pickled) result. A failed build leaves no result,
    so the next worker to ask builds it again and fails with its own error.

    What it builds is shared by every worker: tests read it as it is, or change a `copy_repo` of it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                   # <session>/popen-gwN -> <session>: one per session, all workers
    folder, result = root / f"shared-{name}", root / f"shared-{name}.pickle"
    with FileLock(root / f"shared-{name}.lock"):
        if not result.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            value = build(folder)
            result.write_bytes(pickle.dumps(value))
        return pickle.loads(result.read_bytes())


def _build_tiny_repo(folder: Path) -> tuple[Path, str]:
    work = make_repo(folder, merge(merge(TINY, TINY_NET), {"evaluate": TINY_RUN_EVALUATE}))
    result = run(["dvc", "repro"], work)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "baseline run"], work)
    return work, result.stdout


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> tuple[Path, str]:
    """The pipeline on the tiny synthetic set (TINY and TINY_NET, with TINY_RUN_EVALUATE) in a git + DVC repo, run
    once by `dvc repro` and committed with its dvc.lock and DVC cache: (the repo, repro's output).
    Built once per session (`built_once`); tests read its files as they are, or change or run DVC in
    a `copy_repo` of it."""
    return built_once(tmp_path_factory, "tiny_repo", _build_tiny_repo)


@pytest.fixture(scope="session")
def tiny_run(tiny_repo) -> Path:
    """The tiny pipeline's outputs (`tiny_repo`), for the evaluate and report tests, which only read
    them (copy the folder to change it)."""
    return tiny_repo[0]


def copy_repo(source: Path, destination: Path) -> Path:
    """A copy of a temporary repo (workspace, git history, DVC cache) that a test may change."""
    shutil.copytree(source, destination, symlinks=True)
    return destination


def params_in(work: Path) -> dict:
    """The params.yaml of a working directory."""
    return yaml.safe_load((work / "params.yaml").read_text())


# --- temporary git + DVC repos (end-to-end tests) --------------------------------------------------

# As small as the pipeline allows, for runs that check plumbing, not learning: lr_find takes the
# tiny configuration's range test (enough points below the loss minimum), at train.batch_size.
TINY_RUN = {
    "data": {"source": "synthetic", "synthetic_train_size": 128, "synthetic_test_size": 50},
    "lr_find": TINY["lr_find"],
    "train": {"epochs": 1, "batch_size": 32, "max_at_epoch": 1, "max_lr": 0.003},
    "evaluate": {"batch_size": 50, "gallery_size": 4, "gradcam_size": 2},
}

COPIED = ("dvc.yaml", "params.yaml", "conf", "stages", "src", "pyproject.toml", ".dvc/config", ".dvc/plots",
          ".dvcignore", ".gitignore")
OVERRIDE_CONFIG = "test_overrides"   # conf/test_overrides.yaml in the temporary repo


def add_overrides_to_conf(work: Path, override: dict) -> None:
    """Make `dvc exp run`'s Hydra composition keep `override` in the temporary repo.

    With hydra enabled, `dvc exp run` rewrites params.yaml from conf/, so the tiny settings must
    be in conf/ as well. Merging them into the base (conf/config.yaml) is not enough: the preset
    is composed after the base and sets train.* itself. So they are a config of their own, listed
    in conf/config.yaml's defaults after the preset: every composition, whichever preset it
    picks, keeps them, and `-S` on the command line still wins over them.
    """
    config_path = work / "conf" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["defaults"] = [*config["defaults"], OVERRIDE_CONFIG]
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    (work / "conf" / f"{OVERRIDE_CONFIG}.yaml").write_text(
        "# @package _global_\n" + yaml.safe_dump(override, sort_keys=False))


def make_repo(tmp_path: Path, override: dict) -> Path:
    """A fresh git + DVC repo holding the pipeline, with tiny synthetic params committed (in
    params.yaml for `dvc repro`, and in conf/ for the composition `dvc exp run` makes)."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)
    write_params(work, merge(composed(), override))
    add_overrides_to_conf(work, override)
    run(["git", "init", "-q"], work)
    run(["git", "config", "user.email", "test@example.com"], work)
    run(["git", "config", "user.name", "test"], work)
    run(["git", "add", "-A"], work)
    run(["git", "commit", "-qm", "tiny pipeline"], work)
    return work


# Two presets as named experiments in one fresh repo, then the first again (tests/test_revisit.py and
# test_presets.py). A and B differ in every stage's inputs: the preset changes the model, optimizer
# and report; B's synthetic seed changes the data, so on the way back even download comes from the
# run-cache. A trains at the LR its range test suggests (`find`); B's max LR on the command line wins
# over both the preset's and TINY_RUN's.
PRESET_A = ["-S", "preset=assignment7", "-S", "train.max_lr=find"]
PRESET_B_MAX_LR = 0.01
PRESET_B = ["-S", "preset=assignment10", "-S", "data.synthetic_seed=1", "-S", f"train.max_lr={PRESET_B_MAX_LR}"]
RUN_FILES = ("metrics/test.json", "metrics/training.json", "metrics/evaluate.json", "metrics/max_lr.json",
             "metrics/lr_find.json", "models/model.pt", "reports/report.md")


def exp_run(work: Path, name: str, overrides: list[str]) -> tuple[str, float]:
    """`dvc exp run -n name overrides...`: its output and wall seconds."""
    started = time.perf_counter()
    result = run(["dvc", "exp", "run", "-n", name, *overrides], work)
    return result.stdout, time.perf_counter() - started


def snapshot(work: Path) -> dict[str, bytes]:
    """The bytes of a run's results (RUN_FILES) in the workspace."""
    return {path: (work / path).read_bytes() for path in RUN_FILES}


def _build_preset_runs(folder: Path) -> tuple[Path, dict]:
    work = make_repo(folder, TINY_RUN)
    runs = {}
    for name, overrides in (("a", PRESET_A), ("b", PRESET_B), ("a-again", PRESET_A)):
        output, seconds = exp_run(work, name, overrides)
        runs[name] = {"output": output, "seconds": seconds, "files": snapshot(work)}
    print("\n".join(f"dvc exp run {name}: {r['seconds']:.1f} s" for name, r in runs.items()))
    return work, runs


@pytest.fixture(scope="module")
def preset_runs(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh repo (TINY_RUN, nothing run yet), then `dvc exp run` of A ("a"), B ("b") and A again
    ("a-again"): (the repo, {name: {"output", "seconds", "files"}}). The runs happen once per session
    (`built_once`); each test module gets its own copy of the repo, to run more experiments in or to
    branch and tag them."""
    work, runs = built_once(tmp_path_factory, "preset_runs", _build_preset_runs)
    return copy_repo(work, tmp_path_factory.mktemp("presets") / "repo"), runs


def declared_outputs(work: Path) -> list[Path]:
    from cifarlab import dvcfile

    stages = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]
    return [work / path for stage in stages.values() for path in dvcfile.paths(stage, *dvcfile.OUT_KINDS)]


def exp_rows(shown: list) -> dict:
    """`dvc exp show --json` -> {experiment name: its data (params, metrics)}."""
    rows = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                rows[rev.get("name") or rev["rev"]] = rev["data"]
    return rows


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def queue_tasks(work: Path) -> list[list[str]]:
    """`dvc queue status` -> rows of [task, (name,) created, status]."""
    lines = run(["dvc", "queue", "status"], work).stdout.splitlines()
    return [line.split() for line in lines[1:] if line.strip() and not line.startswith("Worker status")]


def wait_for_queue(work: Path, timeout: float, every: float = 8) -> list[list[str]]:
    """The queue's tasks once each has ended. Asked every `every` seconds: `dvc queue status` takes
    seconds of CPU itself, which the queued runs would otherwise share."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = queue_tasks(work)
        if tasks and all(row[-1] in ("Success", "Failed") for row in tasks):
            return tasks
        time.sleep(every)
    raise AssertionError(f"queue not finished after {timeout:.0f} s:\n{run(['dvc', 'queue', 'status'], work).stdout}")


def processes_in(repo: Path) -> list[str]:
    """`pid cmdline` of every process (not this one) working in `repo` (its experiment copies under
    .dvc/tmp/exps/ included) or naming it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue                       # gone, or a zombie
        if cwd == str(repo) or cwd.startswith(f"{repo}/") or str(repo) in cmdline:
            found.append(f"{entry.name} {cmdline.strip()}")
    return found


def wait_until_none_left(repo: Path, timeout: float) -> tuple[list[str], float]:
    """Poll `processes_in(repo)` until it is empty or `timeout` seconds passed: (what is left, seconds)."""
    started = time.monotonic()
    left = processes_in(repo)
    while left and time.monotonic() - started < timeout:
        time.sleep(0.05)
        left = processes_in(repo)
    return left, time.monotonic() - started
