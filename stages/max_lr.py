"""max_lr stage: the max LR training uses, from `train.max_lr` (a number, or `find`: lr_find's suggestion).

Its own stage so that train depends on the resolved number, not on the whole range test: with a
number, a changed `lr_find.*` rewrites identical bytes here and DVC keeps train. See cifarlab.pipeline.max_lr.
"""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

from cifarlab.config.params import load_params
from cifarlab.errors import run_stage
from cifarlab.pipeline.max_lr import write


def main() -> None:
    write(load_params().train.max_lr)


if __name__ == "__main__":
    run_stage(main)
