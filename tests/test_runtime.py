"""Device, precision, memory format and loader workers chosen per machine (`runtime.*: auto`).

CUDA cannot run here, so its branch is checked by making torch report a GPU: the choice of
precision and of the GradScaler is plain logic that must be right before a GPU ever sees it.
"""

from __future__ import annotations

import pytest
import torch

from cifarlab.config.params import parse_params
from cifarlab.engine import runtime as runtime_module
from cifarlab.engine.runtime import select_runtime
from cifarlab.errors import CifarlabError
from conftest import merge


def runtime_params(default_params, **runtime):
    return parse_params(merge(default_params, {"runtime": runtime})).runtime


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(runtime_module.os, "cpu_count", lambda: 2)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def fake_cuda(monkeypatch, bf16: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


def test_cpu_with_native_bf16(default_params, monkeypatch, no_cuda, two_cores):
    monkeypatch.setattr(runtime_module, "cpu_supports_bf16", lambda: True)
    runtime = select_runtime(runtime_params(default_params))
    assert (runtime.device.type, runtime.precision, runtime.channels_last) == ("cpu", "bf16", True)
    assert runtime.num_workers == 1 and not runtime.needs_grad_scaler()
    assert runtime.autocast_dtype is torch.bfloat16


def test_cpu_without_bf16_stays_fp32_nchw(default_params, monkeypatch, no_cuda, two_cores):
    monkeypatch.setattr(runtime_module, "cpu_supports_bf16", lambda: False)
    runtime = select_runtime(runtime_params(default_params))
    assert (runtime.precision, runtime.channels_last, runtime.autocast_dtype) == ("fp32", False, None)


def test_single_core_cpu_loads_inline(default_params, monkeypatch, no_cuda):
    monkeypatch.setattr(runtime_module.os, "cpu_count", lambda: 1)
    assert select_runtime(runtime_params(default_params)).num_workers == 0


@pytest.mark.parametrize("bf16,precision,scaler", [(True, "bf16", False), (False, "fp16", True)])
def test_cuda_autocast_and_grad_scaler(default_params, monkeypatch, bf16, precision, scaler):
    fake_cuda(monkeypatch, bf16)
    monkeypatch.setattr(runtime_module.os, "cpu_count", lambda: 16)
    runtime = select_runtime(runtime_params(default_params))
    assert (runtime.device.type, runtime.precision, runtime.channels_last) == ("cuda", precision, True)
    assert runtime.needs_grad_scaler() is scaler           # fp16 underflows without loss scaling
    assert runtime.num_workers == 8


def test_explicit_settings_win(default_params, no_cuda):
    runtime = select_runtime(runtime_params(default_params, device="cpu", precision="fp32", channels_last=True,
                                            num_workers=3, compile=True))
    assert (runtime.precision, runtime.channels_last, runtime.num_workers, runtime.compile) == ("fp32", True, 3, True)


def test_cuda_requested_without_a_gpu(default_params, no_cuda):
    with pytest.raises(CifarlabError, match="runtime.device is cuda but no CUDA device is available"):
        select_runtime(runtime_params(default_params, device="cuda"))


def test_fp16_on_cpu_is_refused(default_params, no_cuda):
    with pytest.raises(CifarlabError, match="runtime.precision fp16 needs a CUDA device"):
        select_runtime(runtime_params(default_params, device="cpu", precision="fp16"))


def test_batches_move_to_cuda_without_blocking(monkeypatch):
    """On CUDA, batch copies are asynchronous (they overlap the previous step); on CPU they are not."""
    calls = []

    def record_to(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking"))
        return self

    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    labels = torch.zeros(2, dtype=torch.int64)
    monkeypatch.setattr(torch.Tensor, "to", record_to)
    for device, expected in (("cuda", True), ("cpu", False)):
        calls.clear()
        runtime = runtime_module.Runtime(torch.device(device), "fp32", False, 0)
        runtime_module.to_device(images, labels, runtime)
        assert calls and all(flag is expected for flag in calls), (device, calls)
