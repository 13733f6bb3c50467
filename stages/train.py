"""train stage: OneCycle training of the configured model; writes the checkpoint and curves."""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

from cifarlab import paths
from cifarlab.data import load_dataset
from cifarlab.distributed import init_distributed, shutdown
from cifarlab.engine import select_runtime
from cifarlab.errors import run_stage
from cifarlab.params import load_params
from cifarlab.trainer import fit


def main() -> None:
    params = load_params()
    runtime = select_runtime(params.runtime)
    world = init_distributed(runtime.device.type)
    try:
        fit(params, load_dataset(paths.DATA_DIR), runtime, world)
    finally:
        shutdown()


if __name__ == "__main__":
    run_stage(main)
