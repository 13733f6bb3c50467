"""dvc.yaml's list entries: the one place that knows how an entry spells its path.

A stage's `deps`, `outs`, `metrics` and `plots` (and the top-level `plots`) list entries that are
either a path or a one-key mapping `{path: {flags}}` (e.g. `cache: false`, a plot's axes).
"""

from __future__ import annotations

from typing import Any, Iterable

OUT_KINDS = ("outs", "metrics", "plots")   # what a stage writes


def entry(item: Any) -> tuple[str, dict]:
    """(path, flags) of one list entry; flags is {} for a bare path."""
    if isinstance(item, dict):
        (path, flags), = item.items()
        return str(path), dict(flags or {})
    return str(item), {}


def entries(section: dict, kinds: Iterable[str]) -> list[tuple[str, dict]]:
    """(path, flags) of every entry under `kinds` of a stage (or of dvc.yaml itself, for `plots`)."""
    return [entry(item) for kind in kinds for item in section.get(kind) or []]


def paths(section: dict, *kinds: str) -> list[str]:
    """The paths under `kinds` of a stage (e.g. `paths(stage, "deps")`), in dvc.yaml's order."""
    return [path for path, _ in entries(section, kinds)]
