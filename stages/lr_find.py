"""lr_find stage: LR range test with the training model, optimizer, batch size and augmentation, when
`train.max_lr` is `find` or `lr_find.when` is `always`; otherwise a no-op that imports no torch
(see cifarlab.pipeline.lr_find)."""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

from cifarlab.errors import run_stage


def main() -> None:
    from cifarlab.config.params import load_params
    from cifarlab.pipeline.lr_find import lr_find

    lr_find(load_params())


if __name__ == "__main__":
    run_stage(main)
