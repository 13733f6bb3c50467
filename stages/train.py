"""train stage: OneCycle training of the configured model; writes the checkpoint and curves.

With `runtime.nproc: N > 1` this process starts N training processes of one DDP run and waits for
them (see cifarlab.pipeline.train.train_stage and cifarlab.engine.distributed); a process started that way, or by
torchrun, trains its share.
"""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

from cifarlab.errors import run_stage   # no torch yet: Ctrl-C and SIGTERM are handled from here on


def main() -> None:
    from cifarlab.config.params import load_params
    from cifarlab.pipeline.train import train_stage

    train_stage(load_params(), __file__)


if __name__ == "__main__":
    run_stage(main)
