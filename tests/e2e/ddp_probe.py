"""Runs stages/train.py with every BatchNorm2d replaced by an identity.

Test harness only (tests/test_distributed.py): without BatchNorm, whose statistics are per
process on CPU, a DDP run must reproduce the single-process run up to float summation order.
"""

import runpy
import sys

from torch import nn


class NoNorm(nn.Identity):
    def __init__(self, num_features, *args, **kwargs):
        super().__init__()


nn.BatchNorm2d = NoNorm
sys.path.insert(0, "stages")      # as `python stages/train.py` would: the stage imports stages/_src.py
runpy.run_path("stages/train.py", run_name="__main__")
