"""lr_find stage: LR range test with the training model, optimizer, batch size and augmentation
(see cifarlab.pipeline.lr_find.find_max_lr)."""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

from cifarlab.errors import run_stage


def main() -> None:
    from cifarlab.pipeline.lr_find import find_max_lr
    from cifarlab.config.params import load_params

    find_max_lr(load_params())


if __name__ == "__main__":
    run_stage(main)
