"""The train stage's resume state: which run it belongs to (the run fingerprint), where it lives, and
what it holds, saved after every epoch and restored whole.

The state is `.cache/train/<fingerprint>.pt`: outside DVC's outs (dvcignored and git-ignored), keyed
by the run fingerprint (the params train reads, the resolved max LR and runtime, and every file
dvc.yaml lists as a train dep: data and code). It holds the model, optimizer, scheduler, scaler and
Lookahead states, every process's RNG states and divergence guard, and the run's `TrainingRecord`,
sealed with a digest of that content (`cifarlab.torchfile`) that is checked when it is loaded.
So a rerun after an interruption resumes from the last complete epoch, and any change that makes
DVC rerun train for a params, data or code reason, or a state damaged on disk, starts over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from cifarlab import dvcfile, paths, torchfile
from cifarlab.config.params import Params, ParamsError, read_yaml
from cifarlab.engine.checkpoint import StateWriter
from cifarlab.engine.lookahead import Lookahead
from cifarlab.engine.loops import DivergenceGuard
from cifarlab.engine.runtime import Runtime, rng_state, set_rng_state
from cifarlab.errors import CifarlabError


# --- the run fingerprint --------------------------------------------------------------------------

def train_deps(root: Path = Path(".")) -> list[str]:
    """The train stage's deps as dvc.yaml lists them: the files DVC hashes to decide whether train reruns."""
    try:
        stage = read_yaml(root / "dvc.yaml")["stages"]["train"]
        if "deps" not in stage:
            raise KeyError("deps")
    except (ParamsError, KeyError, TypeError) as err:
        detail = str(err) if isinstance(err, ParamsError) else "it has no stages.train.deps"
        raise CifarlabError(f"cannot read the train stage's deps from {root / 'dvc.yaml'} ({detail}); "
                            f"run train from the repository root, as `dvc repro train` does") from None
    return dvcfile.paths(stage, "deps")


def _dep_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                      and p.suffix != ".pyc")
    return [path]


def _hash_files(files: list[Path], digest, root: Path) -> None:
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        if not path.exists():
            digest.update(b"missing\0")
            continue
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)


def run_fingerprint(params: Params, runtime: Runtime, max_lr: float, root: Path = Path("."),
                    world_size: int = 1) -> str:
    """A hash of everything that determines the run: what a resumed run must share with the saved one.

    The files are exactly the train stage's deps in dvc.yaml (data, the resolved max LR, the stage script
    and the library modules train imports), so editing a module train does not use (report.py, say)
    keeps the saved state, and any edit that makes DVC rerun train for a code or data reason does not.
    """
    digest = hashlib.sha256()
    determining = {name: params.to_dict()[name] for name in ("model", "augment", "optim", "train")}
    determining["evaluate.batch_size"] = params.evaluate.batch_size
    determining["data.subsets"] = [params.data.train_subset, params.data.test_subset]   # which images train sees
    determining["resolved_max_lr"] = max_lr
    determining["runtime"] = {k: v for k, v in runtime.describe().items() if k not in ("threads", "num_workers")}
    determining["world_size"] = world_size
    digest.update(json.dumps(determining, sort_keys=True).encode())
    for dep in train_deps(root):
        _hash_files(_dep_files(root / dep), digest, root)
    return digest.hexdigest()


def state_path(fingerprint: str, state_dir: Path = paths.TRAIN_STATE_DIR) -> Path:
    return state_dir / f"{fingerprint}.pt"


# --- what the state holds -------------------------------------------------------------------------

def _no_series() -> dict[str, list[float]]:
    return {name: [] for name in paths.TRAIN_LOGGED}


@dataclass
class TrainingRecord:
    """What the run logs, epoch by epoch (and `lrs` step by step): saved with the state and restored
    whole, so a resumed run writes the same logs as an uninterrupted one."""

    history: dict[str, list[float]] = field(default_factory=_no_series)   # paths.TRAIN_LOGGED, per epoch
    lrs: list[float] = field(default_factory=list)                        # every optimizer step's LR
    epoch_seconds: list[float] = field(default_factory=list)
    images_per_second: list[float] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)   # where each epoch's wall time went (train_speed.json)


@dataclass(frozen=True)
class Trainables:
    """The objects whose state a resumed run takes back: the model (the plain module, not a DDP or
    compiled wrapper), its optimizer, LR scheduler, and the grad scaler and Lookahead when in use."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    lookahead: Optional[Lookahead]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])


def process_state(guard: DivergenceGuard) -> dict:
    """This process's part of the state: its RNG states and divergence guard (each process has its own;
    the train stage gathers them from every process before rank 0 saves)."""
    return {"rng": rng_state(), "guard": guard.state_dict()}


@dataclass(frozen=True)
class ResumeState:
    """A run's state at the end of `epoch`: everything a resumed run needs to go on exactly as the
    uninterrupted run would have."""

    fingerprint: str
    epoch: int
    trainables: dict            # `Trainables.state_dict()`
    processes: list[dict]       # `process_state` of every process, by rank
    record: TrainingRecord

    def restore(self, trainables: Trainables, guard: DivergenceGuard, rank: int) -> TrainingRecord:
        """Load the state into this process's objects and RNGs; the record goes on from the saved one."""
        trainables.load_state_dict(self.trainables)
        guard.load_state_dict(self.processes[rank]["guard"])   # each process's own guard and RNG states
        set_rng_state(self.processes[rank]["rng"])
        return self.record


def save_resume_state(writer: StateWriter, path: Path, state: ResumeState) -> None:
    """Hand the state to `writer` as plain containers (so its copy buffers are kept from one epoch to
    the next); this waits only for the copy, the file is written while training goes on."""
    flat = {"fingerprint": state.fingerprint, "epoch": state.epoch, "trainables": state.trainables,
            "processes": state.processes,
            "record": {f.name: getattr(state.record, f.name) for f in dataclasses.fields(TrainingRecord)}}
    writer.save(path, flat)


def _from_file(saved: dict) -> ResumeState:
    return ResumeState(saved["fingerprint"], saved["epoch"], saved["trainables"], saved["processes"],
                       TrainingRecord(**saved["record"]))


def load_resume_state(fingerprint: str, state_dir: Path = paths.TRAIN_STATE_DIR, verbose: bool = True
                      ) -> Optional[ResumeState]:
    """This run's saved state, or None (with a line saying why) when there is none to resume.

    The state is checked against the content digest it was saved with (`cifarlab.torchfile`). One
    that is unreadable, or damaged (bytes changed on disk), is never resumed: the run starts over
    instead of stopping, because the state is only a shortcut (training from epoch 1 gives the run
    that the params, data and code define, and replaces the file after its first epoch), while
    stopping would fail every rerun until someone deleted the file by hand."""
    say = print if verbose else (lambda *_: None)
    path = state_path(fingerprint, state_dir)
    if not path.exists():
        others = sorted(state_dir.glob("*.pt")) if state_dir.is_dir() else []
        if others:
            say(f"train: the saved state in {state_dir}/ is from a different run (params, data or code changed), "
                f"starting fresh")
        else:
            say("train: no saved state, starting fresh")
        return None
    try:
        saved = torchfile.load(path, "saved state")
        state = _from_file(saved) if saved["fingerprint"] == fingerprint else None
    except torchfile.DamagedFile as err:
        say(f"train: {err}; starting fresh (a damaged state is never resumed; it is replaced after the first epoch)")
        return None
    except (KeyError, TypeError) as err:   # sealed, but not a resume state of this format
        say(f"train: saved state {path} is unreadable (not a resume state: {err!r}), starting fresh")
        return None
    if state is None:
        say(f"train: saved state {path} is from a different run (params, data or code changed), starting fresh")
        return None
    say(f"train: resuming from the end of epoch {state.epoch} ({path})")
    return state


def remove_resume_state(path: Path) -> None:
    """A completed run's state goes: a rerun (`dvc repro -f`) starts over."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        os.rmdir(path.parent)         # only if no other run's state is left there
