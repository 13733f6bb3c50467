"""evaluate stage: the trained checkpoint on the held-out test split only (see cifarlab.pipeline.evaluate)."""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

from cifarlab.errors import run_stage


def main() -> None:
    from cifarlab.pipeline.evaluate import evaluate_checkpoint
    from cifarlab.config.params import load_params

    evaluate_checkpoint(load_params())


if __name__ == "__main__":
    run_stage(main)
