"""train stage: OneCycle training of the configured model; writes the checkpoint and curves."""

from cifarlab import paths
from cifarlab.data import load_dataset
from cifarlab.engine import select_runtime
from cifarlab.errors import run_stage
from cifarlab.params import load_params
from cifarlab.trainer import fit


def main() -> None:
    params = load_params()
    fit(params, load_dataset(paths.DATA_DIR), select_runtime(params.runtime))


if __name__ == "__main__":
    run_stage(main)
