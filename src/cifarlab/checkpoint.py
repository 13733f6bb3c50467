"""Self-describing checkpoints: weights plus architecture, epoch and the resolved params."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from cifarlab.atomic import write_bytes
from cifarlab.errors import CifarlabError
from cifarlab.models.classifier import Classifier


def save_checkpoint(path: str | Path, model: Classifier, **info: Any) -> None:
    """Equal weights and info give equal bytes: `torch.save` to a file writes that file's name
    (here the random temporary name) into the archive, so it saves to a buffer, whose archive name
    is fixed, and the bytes are written atomically. DVC then sees the same model as the same file."""
    state = {"arch": model.arch, "state_dict": model.state_dict(), **info}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Rebuild the model a checkpoint describes; a missing, truncated or mismatched file is a CifarlabError."""
    path = Path(path)
    if not path.exists():
        raise CifarlabError(f"checkpoint {path} does not exist; run `dvc repro train`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
        arch, weights = state["arch"], state["state_dict"]
    except Exception as err:  # torch raises many types for a damaged file
        first = str(err).splitlines()[0].split(". ")[0]   # torch's first sentence; the rest is boilerplate
        raise CifarlabError(f"checkpoint {path} is unreadable (truncated or not a checkpoint): {first[:200]}") from None
    try:
        model = Classifier(arch, dropout=state.get("dropout", 0.0), num_classes=state.get("num_classes", 10))
    except KeyError as err:
        raise CifarlabError(f"checkpoint {path} names {err.args[0]}") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]   # lines[0] is only "Error(s) in loading state_dict ..."
        raise CifarlabError(f"checkpoint {path} does not fit architecture `{arch}` (weights of another model?): "
                            f"{detail[:200]}") from None
    return model, state
