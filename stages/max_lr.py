"""max_lr stage: the max LR training uses, from `train.max_lr` (a number, or `find`: lr_find's suggestion).

Its own stage so that train depends on the resolved number, not on the whole range test: with a
number, a changed `lr_find.*` rewrites identical bytes here and DVC keeps train. See cifarlab.max_lr.
"""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

from cifarlab import paths
from cifarlab.atomic import write_json
from cifarlab.errors import run_stage
from cifarlab.max_lr import resolve
from cifarlab.params import load_params


def main() -> None:
    chosen = resolve(load_params().train.max_lr)
    write_json(paths.MAX_LR, chosen)
    how = (f"lr_find's `{chosen['rule']}` rule (loss minimum at {chosen['loss_minimum_lr']:.3g})"
           if chosen["chosen_by"] == "lr_find" else "train.max_lr")
    print(f"max_lr: {chosen['max_lr']:.3g} from {how}")


if __name__ == "__main__":
    run_stage(main)
