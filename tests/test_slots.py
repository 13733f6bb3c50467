"""Slots (`cifarlab.engine.slots`): concurrent training runs each get their own GPU, or their share of
the cores, and a killed run frees its share at once.

The GPUs are fake (a pool of names: what CUDA_VISIBLE_DEVICES or the device count gives), and the
other runs are separate `python -c` processes holding slots in a temporary slots folder: flock is
per process, so only other processes show that the runs see each other. Each test takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cifarlab.config.params import ParamsError, parse_params
from cifarlab.engine import slots
from cifarlab.engine.runtime import select_runtime
from cifarlab.engine.slots import Slot, claim_cores, claim_gpu_named, claim_gpus, cpu_share
from cifarlab.errors import CifarlabError
from conftest import merge

# A run holding a slot: prints its slot (or first its waiting line), then holds it until stdin closes.
HOLDER = """
import json, sys
from cifarlab.engine import slots
slots.POLL_SECONDS = 0.05
kind, args = sys.argv[1], json.loads(sys.argv[2])
slot = slots.claim_gpus("train", **args) if kind == "gpu" else slots.claim_cores("train", **args)
print(json.dumps(slot.record()), flush=True)
sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def slots_dir(tmp_path, monkeypatch):
    """Every test's own slots folder (the runs of the machine's real folder are not these tests')."""
    folder = tmp_path / "slots"
    monkeypatch.setenv(slots.SLOTS_DIR_ENV, str(folder))
    monkeypatch.setattr(slots, "POLL_SECONDS", 0.05)
    monkeypatch.delenv(slots.SLOT_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield folder
    if slots.held() is not None:
        slots.held().release()


class Holder:
    """Another run: a process that claims a slot and keeps it."""

    def __init__(self, kind: str, **args):
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, kind, json.dumps(args)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        self.first_line = self.process.stdout.readline().strip()

    @property
    def pid(self) -> int:
        return self.process.pid

    def slot(self) -> dict:
        """Its slot (the next line, after a waiting line)."""
        line = self.first_line if self.first_line.startswith("{") else self.process.stdout.readline()
        assert line.strip().startswith("{"), line
        return json.loads(line)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.process.stdin.close()
        self.process.stdout.close()


@pytest.fixture
def holders():
    started: list[Holder] = []

    def start(kind: str, **args) -> Holder:
        started.append(Holder(kind, **args))
        return started[-1]

    yield start
    for holder in started:
        holder.close()


def pool(count: int) -> list[str]:
    return [str(index) for index in range(count)]


def waits(holder: Holder, seconds: float = 0.5) -> bool:
    """The holder is still waiting after `seconds`: it said so and printed no slot."""
    time.sleep(seconds)
    return holder.first_line.startswith("train: waiting for 1 free GPU") and holder.process.poll() is None


# --- GPUs -----------------------------------------------------------------------------------------

def test_one_gpu_three_runs_take_turns(holders):
    first = holders("gpu", pool=pool(1))
    assert first.slot()["gpus"] == ["0"]
    second, third = holders("gpu", pool=pool(1)), holders("gpu", pool=pool(1))
    assert waits(second) and waits(third, 0)
    assert f"GPU 0: pid {first.pid} train" in second.first_line     # who holds what it waits for
    first.kill()                                                      # SIGKILL: the kernel frees the slot
    winner = _first_to_take(second, third)
    assert json.loads(winner.first_line)["gpus"] == ["0"] and json.loads(winner.first_line)["waited_seconds"] > 0
    other = third if winner is second else second
    assert not _has_slot(other, 0.3), "exactly one waiting run takes the freed GPU"
    winner.kill()
    assert _has_slot(other) and json.loads(other.first_line)["gpus"] == ["0"]


def _first_to_take(*waiting: Holder) -> Holder:
    """The first of the waiting holders to print its slot (within 5 s)."""
    import selectors

    with selectors.DefaultSelector() as selector:
        for holder in waiting:
            selector.register(holder.process.stdout, selectors.EVENT_READ, holder)
        ready = selector.select(timeout=5.0)
    assert ready, "no waiting run took the freed GPU"
    holder = ready[0][0].data
    assert _has_slot(holder, 0)
    return holder


def _has_slot(holder: Holder, seconds: float = 5.0) -> bool:
    """Did the (waiting) holder print its slot within `seconds`? Reads one line if there is one."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(holder.process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=seconds):
            return False
    holder.first_line = holder.process.stdout.readline().strip()
    return holder.first_line.startswith("{")


def test_two_gpus_three_runs(holders):
    first, second = holders("gpu", pool=pool(2)), holders("gpu", pool=pool(2))
    assert sorted(first.slot()["gpus"] + second.slot()["gpus"]) == ["0", "1"]
    third = holders("gpu", pool=pool(2))
    assert waits(third)
    held_by_second = second.slot()["gpus"]
    second.kill()
    assert _has_slot(third) and json.loads(third.first_line)["gpus"] == held_by_second


def test_four_gpus_three_runs_each_get_their_own(holders):
    runs = [holders("gpu", pool=pool(4)) for _ in range(3)]
    taken = [run.slot()["gpus"][0] for run in runs]
    assert sorted(taken) == ["0", "1", "2"]
    mine = claim_gpus("train", pool(4))
    assert (mine.gpus, mine.indices, mine.runs_training) == (["3"], [3], 4)
    assert mine.label == "GPU 3 of 4: the first free GPU (4 of 4 held by runs of this project)"


def test_a_killed_run_frees_its_gpu_at_once(holders):
    first = holders("gpu", pool=pool(2))
    assert first.slot()["gpus"] == ["0"]
    first.kill()
    assert claim_gpus("train", pool(2), timeout=0).gpus == ["0"]


def test_cuda_visible_devices_is_the_pool(monkeypatch, holders):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert slots.gpu_pool(2) == ["5", "7"]
    assert slots.gpu_pool(1) == ["5"]                        # torch sees as many as exist
    other = holders("gpu", pool=["5", "7"])
    assert other.slot()["gpus"] == ["5"]
    mine = claim_gpus("train", slots.gpu_pool(2))
    assert (mine.gpus, mine.indices) == (["7"], [1])          # torch's cuda:1 is GPU 7
    assert mine.label.startswith("GPU 7 of 2 (CUDA_VISIBLE_DEVICES=5,7)")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert slots.gpu_pool(3) == ["0", "1", "2"]


def test_ddp_takes_all_its_gpus_at_once_or_waits(holders, capsys):
    other = holders("gpu", pool=pool(4))
    assert other.slot()["gpus"] == ["0"]
    pair = claim_gpus("train", pool(4), 2)
    assert (pair.gpus, pair.indices) == (["1", "2"], [1, 2])
    assert pair.label.startswith("GPUs 1,2 of 4")
    with pytest.raises(CifarlabError, match="no free GPU within"):
        claim_gpus("train", pool(4), 2, timeout=0.2)           # one is free: it takes none of them
    assert "train: waiting for 2 free GPUs: 3 of 4 are held" in capsys.readouterr().out
    assert claim_gpus("train", pool(4), timeout=0).gpus == ["3"]
    with pytest.raises(CifarlabError, match=r"runtime.nproc is 5 but 4 GPUs are visible; allowed: runtime.nproc at "
                                            r"most 4 on this machine"):
        claim_gpus("train", pool(4), 5)


def test_a_named_gpu_is_used_even_when_held(holders):
    other = holders("gpu", pool=pool(2))
    assert other.slot()["gpus"] == ["0"]
    shared = claim_gpu_named("train", pool(2), 0)
    assert shared.fds == [] and shared.indices == [0]
    assert shared.label == f"GPU 0 of 2: runtime.device cuda:0, shared: pid {other.pid} train holds it"
    free = claim_gpu_named("train", pool(2), 1)
    assert free.fds and free.reason == "runtime.device cuda:1"
    with pytest.raises(CifarlabError, match=r"runtime.device is cuda:2 but 2 GPUs are visible; allowed: "
                                            r"cuda:0..cuda:1, cuda or auto"):
        claim_gpu_named("train", pool(2), 2)


# --- cores ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cores,runs,nproc,workers,threads,expected", [
    (2, 1, 1, None, None, (2, 1, 1)),     # alone on 2 cores: 1 thread + 1 loader worker
    (2, 2, 1, None, None, (1, 1, 0)),     # two runs: one core each, no worker
    (2, 3, 1, None, None, (1, 1, 0)),     # more runs than cores: at least one thread each
    (12, 3, 1, None, None, (4, 3, 1)),
    (8, 1, 2, None, None, (8, 3, 1)),     # DDP: its share divided between its processes
    (12, 2, 1, 3, None, (6, 3, 3)),       # runtime.num_workers: kept, counted
    (12, 2, 1, None, 8, (6, 8, 1)),       # runtime.threads: kept
])
def test_cpu_share(cores, runs, nproc, workers, threads, expected):
    assert cpu_share(cores, runs, nproc, workers, threads) == expected


def test_three_runs_divide_the_cores_and_a_killed_one_leaves(holders):
    first = holders("cpu", cores=12)
    second = holders("cpu", cores=12)
    third = holders("cpu", cores=12)
    records = [first.slot(), second.slot(), third.slot()]
    assert [r["runs_training"] for r in records] == [1, 2, 3]   # each counts the runs training when it starts
    assert [r["number"] for r in records] == [1, 2, 3]
    assert [r["threads"] for r in records] == [11, 5, 3]
    mine = claim_cores("train", 12)
    assert (mine.runs_training, mine.number, mine.threads, mine.num_workers) == (4, 4, 2, 1)
    assert mine.label == "3 of 12 cores: 4 runs training (slot 4), 2 threads + 1 loader worker"
    mine.release()
    first.kill()
    second.kill()
    again = claim_cores("train", 12)
    assert (again.runs_training, again.number) == (2, 1)       # the killed runs' slots are free again


def test_two_runs_on_two_cores_say_so(holders):
    other = holders("cpu", cores=2)
    assert other.slot()["threads"] == 1
    mine = claim_cores("train", 2)
    assert mine.label == "1 of 2 cores: 2 runs training (slot 2), 1 thread + 0 loader workers"


def test_omp_num_threads_caps_the_share(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    slot = claim_cores("train", 12)
    assert slot.threads == 1 and "1 thread (OMP_NUM_THREADS=1)" in slot.label
    slot.release()
    assert claim_cores("train", 12, threads=4).threads == 4          # runtime.threads wins over the cap


# --- the stages' side: claim_for, select_runtime, the launcher's processes --------------------------

def fake_gpus(monkeypatch, count: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    devices = []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    return devices


def runtime_params(default_params, **runtime):
    return parse_params(merge(default_params, {"runtime": runtime})).runtime


def test_a_training_stage_takes_a_free_gpu_and_trains_on_it(default_params, monkeypatch, holders, capsys):
    devices = fake_gpus(monkeypatch, 4)
    other = holders("gpu", pool=pool(4))
    assert other.slot()["gpus"] == ["0"]
    params = runtime_params(default_params)
    slot = slots.claim_for(params, "train")
    assert capsys.readouterr().out == "train: GPU 1 of 4: the first free GPU (2 of 4 held by runs of this project)\n"
    runtime = select_runtime(params, slot)
    assert runtime.device == torch.device("cuda", 1) and devices == [1]
    assert runtime.describe()["device"] == "cuda"        # the fingerprint: a run resumes on any GPU
    assert runtime.placement()["gpus"] == ["1"] and runtime.placement()["reason"] == "the first free GPU"
    assert slots.claim_for(params, "train").gpus == ["1"]   # a second stage in one process: still one run
    named = slots.claim_for(runtime_params(default_params, device="cuda:0"), "lr_find")
    assert select_runtime(runtime_params(default_params, device="cuda:0"), named).device == torch.device("cuda", 0)


def test_a_cpu_stage_trains_on_its_share(default_params, monkeypatch, holders):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(slots, "available_cores", lambda: 4)
    other = holders("cpu", cores=4)
    assert other.slot()["runs_training"] == 1
    params = runtime_params(default_params)
    threads = torch.get_num_threads()
    try:
        runtime = select_runtime(params, slots.claim_for(params, "train"))
        assert (runtime.num_workers, torch.get_num_threads()) == (1, 1)     # 2 of 4 cores: 1 thread + 1 worker
        assert runtime.placement()["label"] == "2 of 4 cores: 2 runs training (slot 2), 1 thread + 1 loader worker"
        select_runtime(runtime_params(default_params, device="cpu", threads=3))   # no slot: runtime.threads alone
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_the_launchers_processes_share_its_slot(monkeypatch):
    gpus = Slot("cuda", "GPUs 1,2 of 4", "the first 2 free GPUs", ["1", "2"], [1, 2], 4, fds=[99])
    env = gpus.child_env()
    assert env["CUDA_VISIBLE_DEVICES"] == "1,2"                  # each process sees its two GPUs as cuda:0, cuda:1
    for name, value in {**env, "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    inherited = slots.claim_for(None, "train")                    # a launched process claims nothing
    assert (inherited.gpus, inherited.indices, inherited.fds) == (["1", "2"], [1], [])
    cores = Slot("cpu", "4 of 8 cores", "2 runs training", cores=8, threads=1, num_workers=1)
    assert cores.child_env()["OMP_NUM_THREADS"] == "1"
    monkeypatch.delenv(slots.SLOT_ENV)
    assert slots.claim_for(None, "train") is None                 # started by torchrun: it placed the process


def test_the_slots_folder_must_be_this_users(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    monkeypatch.setenv(slots.SLOTS_DIR_ENV, str(tmp_path / "link"))
    with pytest.raises(CifarlabError, match=r"the slots folder .*link is not a folder of this user; set "
                                            r"CIFARLAB_SLOTS_DIR to one"):
        claim_cores("train", 2)


# --- params -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("runtime,allowed", [
    ({"device": "cuda:x"}, "`runtime.device` is 'cuda:x'; allowed: one of auto, cpu, cuda, cuda:N"),
    ({"device": "cuda:01"}, "`runtime.device` is 'cuda:01'; allowed: one of auto, cpu, cuda, cuda:N"),
    ({"threads": 0}, "`runtime.threads` is 0; allowed: auto or a whole number >= 1"),
    ({"nnodes": 0}, "`runtime.nnodes` is 0; allowed: a whole number >= 1"),
    ({"rdzv_endpoint": "node0"}, "`runtime.rdzv_endpoint` is 'node0'; allowed: null or HOST:PORT"),
    ({"device": "cuda:1", "nproc": 2}, "`runtime.device` is cuda:1; allowed with runtime.nproc 2: auto or cuda"),
    ({"nnodes": 2}, "`runtime.rdzv_endpoint` is null; allowed with runtime.nnodes 2: HOST:PORT of one of the machines"),
])
def test_bad_runtime_keys_are_one_line(default_params, runtime, allowed):
    with pytest.raises(ParamsError) as err:
        parse_params(merge(default_params, {"runtime": runtime}))
    assert allowed in str(err.value) and "\n" not in str(err.value)


def test_good_runtime_keys(default_params):
    runtime = runtime_params(default_params, device="cuda:3", threads=2, nnodes=2, rdzv_endpoint="10.0.0.5:29400")
    assert (runtime.device, runtime.threads, runtime.nnodes, runtime.rdzv_endpoint) == ("cuda:3", 2, 2,
                                                                                         "10.0.0.5:29400")


def test_the_train_log_and_speed_file_say_which_share(tiny_repo):
    """The tiny pipeline's train stage (`dvc repro`): its share of the machine and why, in its log line
    and in metrics/train_speed.json."""
    work, output = tiny_repo
    slot = json.loads((work / "metrics/train_speed.json").read_text())["slot"]
    assert f"train: {slot['label']}\n" in output
    assert slot["kind"] in ("cpu", "cuda") and slot["runs_training"] >= 1 and slot["reason"]
    if slot["kind"] == "cpu":
        assert " cores: " in slot["label"] and slot["threads"] >= 1
