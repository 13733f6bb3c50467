"""`Conv2d`: torch's `nn.Conv2d`, except that a 3x3 convolution (stride 1, padding 1) computes its
weight gradient on small CPU feature maps as nine matrix products instead of oneDNN's kernel.

On small maps oneDNN's bf16 weight gradient is several times slower than the forward pass of the same
layer, far below what the CPU's matrix units reach on a large matmul. The same gradient is the sum
over the nine kernel taps of grad_out^T @ (the input shifted by that tap), each a plain
[out, N*H*W] x [N*H*W, in] product. On larger maps the shifted copies cost more than they save
(`python bench/convgrad.py` times both per layer shape; its figures are in docs/measurements.md). So
the matrix products are used for maps of at most `SMALL_MAP` pixels on the CPU, and everything else
(the forward pass, the input gradient, larger maps, other geometries, CUDA) is torch's own
convolution.
A drop-in: same arguments, parameters, state_dict and name in model summaries as `nn.Conv2d`; the
gradient is the same sum, rounded in a different order. The models build every conv from it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SMALL_MAP = 25          # pixels (height x width) up to which the CPU weight gradient is nine matmuls


def takes_matmuls(height: int, width: int) -> bool:
    """Whether a 3x3 conv on a CPU map of this size computes its weight gradient as nine matmuls."""
    return height * width <= SMALL_MAP


def torch_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   output_mask: tuple[bool, bool, bool]) -> tuple:
    """torch's own backward of a 3x3, stride 1, padding 1 convolution without bias: (d input,
    d weight, d bias), each computed only where `output_mask` says."""
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                               list(output_mask))


def _weight_grad(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d loss / d weight of a 3x3, stride 1, padding 1 convolution: [out, in, 3, 3] from its input
    x [N, in, H, W] and the output's gradient grad [N, out, H, W]."""
    (height, width), c_in, c_out = x.shape[-2:], x.shape[1], grad.shape[1]
    shifted = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)                  # N, H+2, W+2, in
    grad_t = grad.permute(1, 0, 2, 3).reshape(c_out, -1)                  # out, N*H*W in (n, y, x) order
    taps = grad.new_empty(c_out, 3, 3, c_in)                              # the weight's channels_last layout
    for i in range(3):
        for j in range(3):
            taps[:, i, j] = grad_t @ shifted[:, i:i + height, j:j + width, :].reshape(-1, c_in)
    return taps.permute(0, 3, 1, 2)


class _SmallMapConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, padding=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch_backward(grad, x, weight, (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(x, grad)
        return grad_x, grad_w


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` with the small-map CPU weight gradient above for 3x3, stride 1, padding 1 convs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._three_by_three = (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self._three_by_three and x.device.type == "cpu" and self.weight.requires_grad
                and torch.is_grad_enabled() and takes_matmuls(*x.shape[-2:])):
            return super().forward(x)
        weight = self.weight
        if torch.is_autocast_enabled("cpu"):          # cast as autocast would, then run the function without it
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast("cpu", enabled=False):
            out = _SmallMapConv.apply(x, weight)
        return out if self.bias is None else out + self.bias.to(out.dtype).view(1, -1, 1, 1)
