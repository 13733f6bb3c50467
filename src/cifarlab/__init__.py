"""cifarlab: the library behind the CIFAR-10 DVC pipeline (see README.md and dvc.yaml)."""

import os

# albumentations asks PyPI for its latest version when imported, and warns on every machine that
# cannot reach it (offline cluster nodes, every DataLoader worker). No stage may touch the network
# except `download`: turn the check off before anything imports albumentations (workers inherit it).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
