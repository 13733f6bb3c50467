"""download stage: fetch and verify CIFAR-10 (or generate the synthetic set) into data/."""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

from cifarlab import paths
from cifarlab.config.params import load_params
from cifarlab.data.sources import download
from cifarlab.errors import run_stage


def main() -> None:
    download(load_params().data, paths.DATA_DIR)


if __name__ == "__main__":
    run_stage(main)
