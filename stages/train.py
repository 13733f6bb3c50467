"""train stage: OneCycle training of the configured model; writes the checkpoint and curves.

With `runtime.nproc: N > 1` this process starts N training processes of one DDP run and waits for
them (see cifarlab.distributed); a process started that way, or by torchrun, trains its share.
"""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

from cifarlab.errors import run_stage   # no torch yet: Ctrl-C and SIGTERM are handled from here on


def main() -> None:
    from cifarlab import paths
    from cifarlab.distributed import Distributed, check_batch_size, init_distributed, launch, launched, shutdown
    from cifarlab.engine import select_runtime
    from cifarlab.params import load_params
    from cifarlab.subset import load_subset
    from cifarlab.trainer import fit

    params = load_params()
    runtime = select_runtime(params.runtime)
    subsets = params.data.train_subset, params.data.test_subset   # the images train sees (0 = a whole split)
    if params.runtime.nproc > 1 and not launched():
        check_batch_size(params.train.batch_size, Distributed(world_size=params.runtime.nproc))
        load_subset(paths.DATA_DIR, *subsets)     # a bad data file or subset size is reported once, here
        launch(params.runtime.nproc, __file__)
        return
    world = init_distributed(runtime.device.type)
    try:
        fit(params, load_subset(paths.DATA_DIR, *subsets), runtime, world)
    finally:
        shutdown()


if __name__ == "__main__":
    run_stage(main)
