"""The max LR training uses, resolved once from `train.max_lr` by the `max_lr` stage.

`train.max_lr` is a number or `find` (take lr_find's suggestion). The `max_lr` stage writes the
resolved value to `metrics/max_lr.json`, and train depends on that file, not on the range test's
`metrics/lr_find.json`. So with a number, a new range test (`lr_find.*` changed) rewrites the same
bytes and DVC keeps train ("didn't change"); with `find`, a new suggestion changes the file and
train reruns. The file records only what training and its divergence advice need:

- a number: `{"max_lr": 0.003, "chosen_by": "params", "train.max_lr": 0.003}`, nothing from lr_find;
- `find`: also lr_find's `rule` and its `loss_minimum_lr` (the advice names both when training diverges).

With a number, lr_find runs no range test (`cifarlab.pipeline.lr_find.wanted`) and its file says so;
with `find` it always runs one, and a file that records none is refused in one line.

No torch here: the stage only reads a JSON file and params.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Union

from cifarlab import paths
from cifarlab.atomic import write_json
from cifarlab.config.params import FIND
from cifarlab.errors import CifarlabError

MaxLr = Union[float, str]


def resolve(max_lr: MaxLr, lr_find_metrics: Path = paths.LR_FIND_METRICS) -> dict:
    """What `metrics/max_lr.json` holds for `train.max_lr` (lr_find's file is read only for `find`)."""
    if max_lr != FIND:
        return {"max_lr": float(max_lr), "chosen_by": "params", "train.max_lr": float(max_lr)}
    try:
        found = json.loads(Path(lr_find_metrics).read_text())
        not_run = found.get("ran") is False
        if not not_run:
            chosen = {"max_lr": float(found["max_lr"]), "chosen_by": "lr_find", "train.max_lr": FIND,
                      "rule": str(found["rule"]), "loss_minimum_lr": float(found["loss_minimum_lr"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CifarlabError(f"train.max_lr is `find` but {lr_find_metrics} is missing or incomplete; "
                            f"run `dvc repro lr_find` or set train.max_lr to a number") from None
    if not_run:
        raise CifarlabError(f"train.max_lr is `find` but {lr_find_metrics} records no range test (lr_find ran for a "
                            f"numeric train.max_lr); run `dvc repro lr_find` or set train.max_lr to a number")
    if not (math.isfinite(chosen["max_lr"]) and chosen["max_lr"] > 0):
        raise CifarlabError(f"{lr_find_metrics} suggests max_lr {chosen['max_lr']}, not a number > 0; "
                            f"rerun `dvc repro lr_find` or set train.max_lr to a number")
    return chosen


def read(max_lr: MaxLr, resolved: Path = paths.MAX_LR) -> dict:
    """The max LR train uses, read once from the `max_lr` stage's file.

    The file must have been resolved for this `train.max_lr` (under DVC it always is: the `max_lr`
    stage depends on that param and runs before train). Without the file, a number needs no
    resolving (a stage script run by hand, outside DVC); `find` does.
    """
    if not Path(resolved).exists():
        if max_lr != FIND:
            return resolve(max_lr)
        raise CifarlabError(f"train.max_lr is `find` but {resolved} is missing; run `dvc repro max_lr` "
                            f"(after lr_find) or set train.max_lr to a number")
    try:
        chosen = json.loads(Path(resolved).read_text())
        float(chosen["max_lr"]), str(chosen["chosen_by"]), chosen["train.max_lr"]
        if chosen["chosen_by"] == "lr_find":
            str(chosen["rule"]), float(chosen["loss_minimum_lr"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CifarlabError(f"{resolved} is unreadable or incomplete; run `dvc repro max_lr`") from None
    wanted = FIND if max_lr == FIND else float(max_lr)
    if chosen["train.max_lr"] != wanted:
        raise CifarlabError(f"{resolved} was resolved for train.max_lr {chosen['train.max_lr']} but params.yaml has "
                            f"{max_lr}; run `dvc repro max_lr` (or `dvc repro train`, which runs it first)")
    return chosen


def write(max_lr: MaxLr, out: Path = paths.MAX_LR) -> dict:
    """The max_lr stage: resolve `train.max_lr`, write it to `out` and say where it came from."""
    chosen = resolve(max_lr)
    write_json(out, chosen)
    how = (f"lr_find's `{chosen['rule']}` rule (loss minimum at {chosen['loss_minimum_lr']:.3g})"
           if chosen["chosen_by"] == "lr_find" else "train.max_lr")
    print(f"max_lr: {chosen['max_lr']:.3g} from {how}")
    return chosen
