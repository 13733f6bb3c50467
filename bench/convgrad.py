"""The weight gradient of a 3x3 convolution on the CPU: torch's own kernel (oneDNN) against the
nine matrix products of `cifarlab.models.conv`, per layer shape, in milliseconds per batch.

It decides `cifarlab.models.conv.SMALL_MAP` (the largest map that takes the matrix products) and
says what it saves each model per training step. Asserts nothing, writes nothing.

    python bench/convgrad.py                          # bf16, channels_last, batch 1024
    python bench/convgrad.py --batch-size 512 --dtype fp32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cifarlab.models.conv import SMALL_MAP, _weight_grad, takes_matmuls, torch_backward  # noqa: E402

# (in, out, side): fast_net's four 3x3 shapes after its first two, the custom ResNets' 4x4 and 8x8
# layers, and sizes in between to place the threshold.
SHAPES = [(64, 256, 15), (256, 256, 7), (256, 256, 5), (256, 256, 4), (256, 256, 3), (128, 128, 8),
          (256, 256, 8), (512, 512, 4)]


def _milliseconds(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"threads: {torch.get_num_threads()}  batch: {args.batch_size}  dtype: {args.dtype}  "
          f"SMALL_MAP: {SMALL_MAP} pixels")
    print(f"{'in':>4} {'out':>4} {'map':>5} {'onednn_ms':>10} {'matmul_ms':>10} {'ratio':>6}  used")
    for c_in, c_out, side in SHAPES:
        def tensor(channels):
            return torch.randn(args.batch_size, channels, side, side, dtype=dtype).to(
                memory_format=torch.channels_last)
        x, grad = tensor(c_in), tensor(c_out)
        weight = torch.randn(c_out, c_in, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)
        onednn = _milliseconds(lambda: torch_backward(grad, x, weight, (False, True, False)), args.repeats)
        matmul = _milliseconds(lambda: _weight_grad(x, grad), args.repeats)
        used = "matmul" if takes_matmuls(side, side) else "onednn"
        print(f"{c_in:>4} {c_out:>4} {side:>2}x{side:<2} {onednn:>10.1f} {matmul:>10.1f} {onednn / matmul:>6.2f}  {used}",
              flush=True)


if __name__ == "__main__":
    main()
