"""cifarlab: the library behind the CIFAR-10 DVC pipeline (see README.md and dvc.yaml)."""

__version__ = "0.1.0"
