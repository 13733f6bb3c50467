"""download stage: fetch and verify CIFAR-10 (or generate the synthetic set) into data/."""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

import tempfile
from pathlib import Path

from cifarlab import paths
from cifarlab.errors import run_stage
from cifarlab.params import load_params
from cifarlab.sources import fetch, make_synthetic, read_cifar10_tarball
from cifarlab.storage import save_dataset


def main() -> None:
    data = load_params().data
    if data.source == "synthetic":
        dataset = make_synthetic(data.synthetic_train_size, data.synthetic_test_size, data.synthetic_seed)
        extra = {"synthetic_seed": data.synthetic_seed}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tarball = Path(tmp) / "cifar-10-python.tar.gz"
            fetch(data.url, tarball, data.md5)
            dataset = read_cifar10_tarball(tarball, origin=data.url)
        extra = {"url": data.url, "md5": data.md5}
    save_dataset(dataset, paths.DATA_DIR, extra)
    print(f"download: {dataset.source}, {len(dataset.train)} train / {len(dataset.test)} test images "
          f"-> {paths.DATA_DIR}/")


if __name__ == "__main__":
    run_stage(main)
