"""Runs stages/train.py with every BatchNorm2d replaced by an identity.

Test harness only (tests/test_distributed.py): without BatchNorm, whose statistics are per
process on CPU, a DDP run must reproduce the single-process run up to float summation order.
"""

import runpy

from torch import nn


class NoNorm(nn.Identity):
    def __init__(self, num_features, *args, **kwargs):
        super().__init__()


nn.BatchNorm2d = NoNorm
runpy.run_path("stages/train.py", run_name="__main__")
