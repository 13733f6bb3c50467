"""`cifarlab.models.conv.Conv2d`: the same convolution and gradients as `nn.Conv2d`, with the weight
gradient of small 3x3 maps on the CPU taken as nine matrix products."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import cifarlab.models.conv as conv
from cifarlab.models.names import model_names
from cifarlab.models.registry import create_model


@pytest.fixture
def matmul_calls(monkeypatch) -> list[int]:
    """Counts the small-map weight gradients taken."""
    calls: list[int] = []
    original = conv._weight_grad

    def counted(x, grad):
        calls.append(1)
        return original(x, grad)

    monkeypatch.setattr(conv, "_weight_grad", counted)
    return calls


def _pair(c_in: int, c_out: int, channels_last: bool, **kwargs) -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(0)
    ours = conv.Conv2d(c_in, c_out, 3, **kwargs)
    theirs = nn.Conv2d(c_in, c_out, 3, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    if channels_last:
        ours, theirs = (m.to(memory_format=torch.channels_last) for m in (ours, theirs))
    return ours, theirs


def _grads(module: nn.Module, x: torch.Tensor, weights: torch.Tensor, autocast: bool = False):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(x)
    (out.float() * weights).sum().backward()
    grads = [x.grad, module.weight.grad] + ([module.bias.grad] if module.bias is not None else [])
    return out, grads


@pytest.mark.parametrize("side", [3, 5])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_small_maps_give_nn_conv2d_gradients_through_the_matmuls(side, channels_last, bias, matmul_calls):
    ours, theirs = _pair(6, 10, channels_last, padding=1, bias=bias)
    x = torch.randn(4, 6, side, side)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weights = torch.randn(4, 10, side, side)
    out, grads = _grads(ours, x, weights)
    ref_out, ref_grads = _grads(theirs, x, weights)
    assert matmul_calls == [1]
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_keeps_its_dtypes_and_values(matmul_calls):
    ours, theirs = _pair(16, 32, True, padding=1)
    x = torch.randn(8, 16, 3, 3).to(memory_format=torch.channels_last)
    weights = torch.randn(8, 32, 3, 3)
    out, grads = _grads(ours, x, weights, autocast=True)
    ref_out, ref_grads = _grads(theirs, x, weights, autocast=True)
    assert matmul_calls == [1]
    assert out.dtype == ref_out.dtype == torch.bfloat16
    assert grads[1].dtype == torch.float32                     # the master weight's gradient
    # bf16 rounding: the forward runs outside autograd here, where oneDNN may pick another kernel
    assert (out.float() - ref_out.float()).abs().max() <= 2 ** -7 * ref_out.float().abs().max()
    scale = ref_grads[1].abs().max()
    assert (grads[1] - ref_grads[1]).abs().max() <= 0.02 * scale     # bf16 rounding, summed in another order
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=2 ** -7, atol=2 ** -7 * ref_grads[0].abs().max().item())


def test_the_weight_gradient_passes_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(conv._SmallMapConv.apply, (x, weight))


@pytest.mark.parametrize("side,kwargs", [
    (6, dict(padding=1)),                     # a map above SMALL_MAP pixels
    (3, dict(padding=1, stride=2)),           # other geometries
    (3, dict(padding=2, dilation=2)),
    (3, dict(padding=1, groups=2)),
    (3, dict(padding=0)),
])
def test_everything_else_is_torch_own_convolution(side, kwargs, matmul_calls):
    assert not conv.takes_matmuls(side, side) or kwargs != dict(padding=1)
    ours, theirs = _pair(4, 8, False, **kwargs)
    x = torch.randn(2, 4, side, side)
    weights = torch.ones_like(theirs(x))
    for got, want in zip(_grads(ours, x, weights)[1], _grads(theirs, x, weights)[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert matmul_calls == []


def test_no_grad_and_frozen_weights_skip_the_function(matmul_calls):
    ours, _ = _pair(4, 8, False, padding=1)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with torch.no_grad():
        ours(x)
    ours.weight.requires_grad_(False)
    ours(x).sum().backward()
    assert matmul_calls == [] and x.grad is not None


@pytest.mark.parametrize("name", model_names())
def test_every_model_builds_its_convs_from_it(name):
    convs = [m for m in create_model(name).modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is conv.Conv2d for m in convs)
