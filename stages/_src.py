"""Put this checkout's `src/` first on `sys.path`, so a stage runs the code dvc.yaml hashes as its deps.

`pip install -e .` points at one working tree, but DVC also runs stages in other copies of the
repo: queued experiments run in `.dvc/tmp/exps/...`, and a second clone has its own `src/`.
Without this, those copies would silently run the installed tree's code instead of their own.
Every stage script imports this module before anything from `cifarlab`.
"""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)
