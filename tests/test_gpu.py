"""The CUDA path end to end: the default preset trained for 2 epochs and evaluated on tiny synthetic
data, watching every forward pass of the model, so nothing silently runs on the CPU or in the wrong
precision or memory format.

`gpu`-marked tests need a CUDA device and are skipped without one (select them with `-m gpu`). The
same watcher also runs here on the CPU, on a small model, so the harness itself is tested where
there is no GPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import merge, write_params

GPU_RUN = {   # the default preset (custom_resnet, batch 512, Adam + OneCycle), 2 epochs of 2 steps
    "data": {"source": "synthetic", "synthetic_train_size": 1024, "synthetic_test_size": 200},
    "train": {"epochs": 2, "max_at_epoch": 1},
    "evaluate": {"gallery_size": 4, "gradcam_size": 3},
}
CPU_RUN = {   # the harness on the CPU: a small model, 2 epochs of 2 steps
    "data": {"source": "synthetic", "synthetic_train_size": 128, "synthetic_test_size": 64},
    "model": {"name": "a7_net"},
    "train": {"epochs": 2, "max_at_epoch": 1, "batch_size": 64, "max_lr": 0.003},
    "evaluate": {"batch_size": 64, "gallery_size": 4, "gradcam_size": 3},
}


def autocast_dtype(device_type: str):
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


class Watcher:
    """A forward pre-hook that records, for every call of the model, where its inputs and parameters
    were, the autocast state, the input's memory format, and whether gradients were on."""

    def __init__(self):
        self.phase = "train"
        self.calls: list[dict] = []

    def __call__(self, module, args):
        x = args[0]
        devices = {p.device.type for p in module.parameters()} | {b.device.type for b in module.buffers()}
        self.calls.append({
            "phase": self.phase, "input": x.device.type, "module": devices, "dtype": x.dtype,
            "channels_last": x.is_contiguous(memory_format=torch.channels_last),
            "autocast": torch.is_autocast_enabled(x.device.type),
            "autocast_dtype": autocast_dtype(x.device.type), "grad": torch.is_grad_enabled()})

    def __deepcopy__(self, memo):
        return self                             # a deep copy of the model (Grad-CAM's) reports here too

    def watch(self, model):
        model.register_forward_pre_hook(self)
        return model


def train_and_evaluate(work: Path, params: dict, monkeypatch) -> tuple[Watcher, dict, dict, object]:
    """Run the train and evaluate stages' library calls in `work` with `params` (on synthetic data of
    their sizes), in this process, watching the model."""
    from cifarlab.pipeline import evaluate as evaluator, train as trainer
    from cifarlab.pipeline.evaluate import evaluate_checkpoint
    from cifarlab.config.params import load_params
    from cifarlab.engine.runtime import select_runtime
    from cifarlab.data.sources import make_synthetic
    from cifarlab.data.storage import load_dataset, save_dataset

    write_params(work, params)
    data = params["data"]
    shutil.rmtree(work / "data")
    save_dataset(make_synthetic(data["synthetic_train_size"], data["synthetic_test_size"], data["synthetic_seed"]),
                 work / "data")

    watcher = Watcher()
    build_model, prepare_model = trainer.build_model, evaluator.prepare_model
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: watcher.watch(build_model(*a, **k)))
    monkeypatch.setattr(evaluator, "prepare_model", lambda *a, **k: watcher.watch(prepare_model(*a, **k)))
    monkeypatch.chdir(work)
    params = load_params()
    runtime = select_runtime(params.runtime)
    trainer.fit(params, load_dataset("data"), runtime)
    watcher.phase = "evaluate"
    evaluate_checkpoint(params)
    speed = json.loads(Path("metrics/train_speed.json").read_text())
    record = json.loads(Path("metrics/evaluate_run.json").read_text())
    return watcher, speed, record, runtime


def check_run(watcher: Watcher, speed: dict, record: dict, device: str, precision: str, channels_last: bool,
              steps: int) -> None:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    calls = watcher.calls
    assert calls
    for call in calls:   # no forward pass anywhere ran on, or with a module part on, another device
        assert call["input"] == device and call["module"] == {device}, call
    training = [c for c in calls if c["phase"] == "train" and c["grad"]]
    test_passes = [c for c in calls if c["phase"] == "train" and not c["grad"]]
    measured = [c for c in calls if c["phase"] == "evaluate" and not c["grad"]]
    cams = [c for c in calls if c["phase"] == "evaluate" and c["grad"]]
    assert len(training) == steps                  # every training step, each on the device
    assert test_passes and measured and len(cams) == 2         # Grad-CAM: predicted and true classes
    for call in training + test_passes + measured:
        assert call["autocast"] is (dtype is not None), call
        if dtype is not None:
            assert call["autocast_dtype"] == dtype, call
        assert call["channels_last"] is channels_last, call
    for call in cams:                                          # Grad-CAM: fp32, on the same device
        assert not call["autocast"] and call["dtype"] == torch.float32, call
    for what in (speed, record):
        assert (what["device"], what["precision"], what["channels_last"]) == (device, precision, channels_last)
    assert (record["gradcam_device"], record["gradcam_precision"]) == (device, "fp32")
    assert [p["epoch"] for p in speed["epoch_phases"]] == [1, 2]
    for p in speed["epoch_phases"]:   # where each epoch's time went adds up
        assert min(p[name] for name in ("steps", "data_wait", "first_batch", "test_pass", "state_save")) >= 0, p
        assert p["data_wait"] >= p["first_batch"] and p["overhead"] >= p["data_wait"] + p["state_save"] - 1e-9, p
        assert p["seconds"] == pytest.approx(p["steps"] + p["test_pass"] + p["overhead"]), p
        assert p["overhead"] == pytest.approx(p["data_wait"] + p["state_save"] + p["other"]), p
    assert len(speed["state_write_seconds"]) == 2 and speed["epoch_phase_means"]["overhead_seconds_mean"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_preset_trains_and_evaluates_on_cuda(stage_dir, default_params, monkeypatch):
    params = merge(default_params, GPU_RUN)
    assert params["train"]["batch_size"] == 512 and params["model"]["name"] == "custom_resnet"
    torch.cuda.reset_peak_memory_stats()
    watcher, speed, record, runtime = train_and_evaluate(stage_dir, params, monkeypatch)
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert runtime.num_workers > 0           # the loader's persistent workers, with pinned memory
    check_run(watcher, speed, record, "cuda", precision, channels_last=True, steps=2 * 2)
    assert torch.cuda.max_memory_allocated() > 0


def test_the_watcher_on_the_cpu(stage_dir, default_params, monkeypatch):
    """The harness of the CUDA test, here: the same checks hold for the CPU runtime this machine picks."""
    from cifarlab.engine.runtime import cpu_supports_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    watcher, speed, record, _ = train_and_evaluate(stage_dir, merge(default_params, CPU_RUN), monkeypatch)
    bf16 = cpu_supports_bf16()
    check_run(watcher, speed, record, "cpu", "bf16" if bf16 else "fp32", channels_last=bf16, steps=2 * 2)


# --- the pieces of the CUDA path ------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]


class NaNAfter(torch.nn.Module):
    """A tiny classifier whose output turns NaN from its `after`-th training call on."""

    def __init__(self, after: int):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, 10)
        self.after, self.calls = after, 0

    def forward(self, x):
        logits = self.fc(x.float().flatten(1) / 255)
        self.calls += 1
        return logits * float("nan") if self.calls > self.after else logits


def batches(count: int, size: int = 4) -> list:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=generator),
             torch.randint(0, 10, (size,), generator=generator)) for _ in range(count)]


@pytest.mark.parametrize("device", DEVICES)
def test_a_divergence_names_its_step_on_every_device(device):
    """On CUDA the guard's verdict is read without waiting for the device, so it may be noticed a few
    checks later than on the CPU; the error still names the step where the loss went bad."""
    from cifarlab.engine.loops import DivergenceGuard, TrainingDiverged, train_one_epoch
    from cifarlab.engine.runtime import Runtime

    runtime = Runtime(torch.device(device), "fp32", device == "cuda", 0)
    model = NaNAfter(after=13).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=200)
    guard = DivergenceGuard(4.0, torch.device(device))
    with pytest.raises(TrainingDiverged, match=r"training diverged at epoch 1, step 13 .*loss nan is not finite"):
        train_one_epoch(model, batches(60), optimizer, scheduler, runtime, guard=guard)


@needs_cuda
@pytest.mark.gpu
def test_cuda_batches_overlap_copies_and_keep_their_values():
    from cifarlab.engine.loops import DeviceReadout
    from cifarlab.engine.runtime import device_batches, Runtime

    runtime = Runtime(torch.device("cuda"), "bf16", True, 0)
    host = [(images.pin_memory(), labels.pin_memory()) for images, labels in batches(6)]
    moved = [(images.clone(), labels.clone()) for images, labels in device_batches(host, runtime)]
    for (images, labels), (host_images, host_labels) in zip(moved, host):
        assert images.is_cuda and labels.is_cuda and images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images.cpu(), host_images) and torch.equal(labels.cpu(), host_labels)
    readout = DeviceReadout(torch.device("cuda"))
    assert readout.latest() is None
    readout.post((torch.full((), 3.0, device="cuda"), torch.ones((), dtype=torch.bool, device="cuda")), 7)
    torch.cuda.synchronize()
    (value, flag), note = readout.latest()
    assert (float(value), bool(flag), note) == (3.0, True, 7) and not value.is_cuda


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("pad_mode, cutout", [("reflect", 0), ("constant", 8)])
def test_the_batch_path_never_makes_the_host_wait_for_the_gpu(pad_mode, cutout):
    """After the epoch's one index copy, gathering and augmenting a batch queues device work only: a
    host-to-device copy per batch (indices, a hash key, the fill colour) would wait for every step queued
    before it, and the GPU would idle while the host queued the next (the fast preset on an H200: 27% of
    each epoch's time went to such waits)."""
    from cifarlab.data.batch_augment import BatchAugment
    from cifarlab.data.loaders import DeviceBatchLoader
    from cifarlab.data.sources import make_synthetic

    split = make_synthetic(train_size=4096, test_size=10, seed=0).train
    augment = BatchAugment(pad=2, pad_mode=pad_mode, hflip=0.5, cutout_size=cutout, cutout_p=0.5 if cutout else 0.0,
                           alternate_flip=True)
    loader = DeviceBatchLoader(split, augment, 1024, seed=0, device=torch.device("cuda"))
    for epoch in (1, 2):
        batches = iter(loader.epoch(epoch))
        first = next(batches)                      # the epoch's index copy, and the fill colour's first use
        torch.cuda.set_sync_debug_mode("error")
        try:
            rest = list(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len(rest) == 3 and first[0].is_cuda and all(images.is_cuda for images, _ in rest)
