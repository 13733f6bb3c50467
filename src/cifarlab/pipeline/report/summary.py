"""The report's one read of the other stages' outputs: `read_summary` reads every file the report
uses, once, into a `RunSummary`, and a missing or inconsistent one is a one-line error. The
sections (`sections.py`) draw only on the summary, so each renders alone from a hand-built one.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from cifarlab import paths, torchfile
from cifarlab.config.params import FIND, AugmentParams, ReportParams
from cifarlab.errors import CifarlabError

LIBRARIES = ("torch", "numpy", "albumentations", "torch-lr-finder", "torchinfo", "matplotlib", "dvc", "dvclive")

# Figures copied as the train and evaluate stages drew them.
COPIED_FIGURES = (paths.AUGMENT_PREVIEW, paths.CONFUSION_FIGURE, paths.PER_CLASS_FIGURE,
                  paths.MISCLASSIFIED_FIGURE, paths.GRADCAM_FIGURE)


# --- which run this is --------------------------------------------------------------------------

@dataclass(frozen=True)
class RunIdentity:
    """The experiment and git revision of the run. `dvc exp run` (workspace or queued) gives every
    stage it runs DVC_EXP_NAME and DVC_EXP_BASELINE_REV (dvc/repo/experiments/queue/base.py, passed
    on by dvc/stage/run.py); `dvc repro` and a plain `python stages/report.py` give neither."""
    experiment: Optional[str]   # the experiment's name; None outside `dvc exp run`
    revision: Optional[str]     # short hash: the experiment's baseline commit, else the checkout's HEAD
    no_revision: str = ""       # why there is none, when revision is None

    def describe(self) -> str:
        if self.experiment:
            where = f"baseline commit `{self.revision}`" if self.revision else self.no_revision
            return f"experiment **{self.experiment}** (`dvc exp run`), from {where}"
        where = f"commit `{self.revision}`" if self.revision else self.no_revision
        return f"workspace (not a DVC experiment), at {where}"


def _git_short(rev: str, cwd: Path) -> tuple[Optional[str], str]:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "--verify", "--quiet", f"{rev}^{{commit}}"],
                              cwd=cwd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None, "no git revision (git is not installed)"
    except (OSError, subprocess.TimeoutExpired):
        return None, "no git revision (git did not answer)"
    if done.returncode != 0 or not done.stdout.strip():
        return None, "no git revision (not in a git repository, or no commit yet)"
    return done.stdout.strip(), ""


def run_identity(environ: Mapping[str, str] = os.environ, cwd: Path = Path(".")) -> RunIdentity:
    experiment = environ.get("DVC_EXP_NAME") or None
    baseline = environ.get("DVC_EXP_BASELINE_REV") or None
    revision, why = _git_short(baseline or "HEAD", cwd)
    if revision is None and baseline:             # a full hash from DVC, even where git cannot resolve it
        revision, why = baseline[:7], ""
    return RunIdentity(experiment, revision, why)


# --- reading the stages' outputs ----------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CifarlabError(f"report needs {path}, which is missing or unreadable ({err}); run `dvc repro`") from None


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except OSError as err:
        raise CifarlabError(f"report needs {path}, which is missing or unreadable ({err}); run `dvc repro`") from None


def read_history(live_dir: Path = paths.TRAIN_LIVE_DIR) -> dict[str, list[float]]:
    """Per-epoch series logged by dvclive, keyed by metric name (train/loss, test/accuracy, lr...)."""
    history: dict[str, list[float]] = {}
    root = live_dir / "plots" / "metrics"
    for tsv in sorted(root.rglob("*.tsv")):
        name = tsv.relative_to(root).with_suffix("").as_posix()
        with tsv.open() as handle:
            rows = sorted(csv.DictReader(handle, delimiter="\t"), key=lambda row: int(row["step"]))
        history[name] = [float(row[tsv.stem]) for row in rows]
    missing = [name for name in paths.TRAIN_LOGGED if name not in history]
    if missing:
        raise CifarlabError(f"report needs the per-epoch metrics under {root}/ (missing {', '.join(missing)}); "
                            f"run `dvc repro train`")
    return history


def read_lr_schedule(path: Path = paths.LR_SCHEDULE) -> list[float]:
    return [float(row["lr"]) for row in _read_csv(path)]


def read_lr_curve(path: Path = paths.LR_FIND_CURVE) -> tuple[list[float], list[float]]:
    """The range test's (lr, smoothed loss); empty when it was not run (its one row has no LR, only a note)."""
    rows = [row for row in _read_csv(path) if row["lr"]]
    return [float(row["lr"]) for row in rows], [float(row["loss"]) for row in rows]


def read_confusion(classes: list[str], path: Path = paths.CONFUSION) -> np.ndarray:
    """The [true, predicted] count matrix from the DVC confusion plot's data (one row per test image)."""
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    try:
        for row in _read_csv(path):
            matrix[index[row["actual"]], index[row["predicted"]]] += 1
    except KeyError as err:
        raise CifarlabError(f"{path} names class {err.args[0]!r}, which metrics/evaluate.json does not") from None
    return matrix


def model_summary(arch: str, num_classes: int = 10, dropout: float = 0.0) -> tuple[str, int]:
    """torchinfo's table for the network (without the normalisation layer) and its parameter count."""
    from torchinfo import summary

    from cifarlab.models.registry import create_model

    stats = summary(create_model(arch, num_classes=num_classes, dropout=dropout), input_size=(1, 3, 32, 32),
                    verbose=0, col_names=("output_size", "num_params"), depth=3)
    # some torchinfo/torch combinations print the unit enum's repr instead of its symbol
    text = str(stats).replace("(Units.MEGABYTES)", "(M)").replace("(Units.GIGABYTES)", "(G)")
    return text, int(stats.total_params)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_params(checkpoint_params: dict, evaluate_run: dict, report: ReportParams) -> dict:
    """The params the run used: train's resolved copy in the checkpoint, with the sections train does
    not read taken from the stages that do (evaluate records its own; report's are this stage's)."""
    run = copy.deepcopy(checkpoint_params)
    if "evaluate" in evaluate_run.get("params", {}):
        run["evaluate"] = evaluate_run["params"]["evaluate"]
    run["report"] = dataclasses.asdict(report)
    return run


@dataclass(frozen=True)
class RunSummary:
    """Everything the report shows, read once from the stages' outputs by `read_summary`."""
    report: ReportParams
    identity: RunIdentity
    run: dict                                  # the params the run used (`run_params`)
    evaluation: dict                           # metrics/evaluate.json
    evaluate_run: dict                         # metrics/evaluate_run.json
    lr_find: dict                              # metrics/lr_find.json (`"ran": false` when nothing used it)
    training: dict                             # metrics/training.json (epochs, max LR, speed)
    speed: dict                                # metrics/train_speed.json
    history: dict[str, list[float]]            # per-epoch series (`read_history`)
    lrs: list[float]                           # the LR of every batch
    finder_curve: tuple[list[float], list[float]]   # the range test's (lr, smoothed loss); empty if not run
    confusion: np.ndarray                      # [true, predicted] counts of the test split
    arch: str
    parameters: int
    dropout: float
    model_source: str                          # which seed write-up the architecture reproduces
    model_table: str                           # torchinfo's summary
    last_epoch: int                            # the checkpoint's epoch
    max_lr: float                              # the max LR training used
    checkpoint_mb: float
    versions: dict[str, str]                   # library -> version, python, platform
    figure_sources: dict[str, Path]            # copied figure's file name -> the stage output it comes from

    @property
    def classes(self) -> list[str]:
        return list(self.evaluation["per_class_accuracy"])

    @property
    def test_images(self) -> int:
        return int(self.evaluation["test_images"])

    @property
    def accuracy(self) -> float:
        return self.evaluation["accuracy"]

    @property
    def synthetic(self) -> bool:
        return self.evaluation["data_source"] == "synthetic"

    @property
    def judged(self) -> bool:
        """Is the accuracy judged against the target? Not on synthetic data: the target belongs to CIFAR-10.
        The one home of that choice, for the result's text and the curves' target line alike."""
        return not self.synthetic

    @property
    def range_test_ran(self) -> bool:
        return self.lr_find.get("ran", True)

    @property
    def epochs(self) -> int:
        return len(self.history["train/loss"])

    @property
    def budget(self) -> str:
        """The budget (conf/budget/) the run was composed with, from the checkpoint's params."""
        return self.run["budget"]["name"]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lrs) // self.epochs

    @property
    def train(self) -> dict:
        return self.run["train"]

    @property
    def from_find(self) -> bool:
        return self.train["max_lr"] == FIND

    @property
    def augment(self) -> AugmentParams:
        return AugmentParams(**self.run["augment"])


def read_checkpoint(path: Path = paths.CHECKPOINT) -> dict:
    """The checkpoint's contents (the report rebuilds no model): a missing, empty, truncated, garbage
    or changed file is one line naming it, as `cifarlab.engine.checkpoint.load_checkpoint` says it."""
    if not path.exists():
        raise CifarlabError(f"report needs {path}; run `dvc repro train`")
    try:
        checkpoint = torchfile.load(path, "checkpoint", require_digest=False)
    except torchfile.DamagedFile as err:
        raise CifarlabError(f"{err}; `dvc repro train` restores it") from None
    missing = [key for key in ("arch", "params", "max_lr") if key not in checkpoint]
    if missing:
        raise CifarlabError(f"checkpoint {path} is not a model checkpoint: it has no `{missing[0]}`; "
                            f"`dvc repro train` restores it")
    return checkpoint


def read_summary(params: ReportParams, environ: Mapping[str, str] = os.environ) -> RunSummary:
    """Read every output the report uses, once; a missing or inconsistent one is a one-line error."""
    from cifarlab.models.registry import model_spec

    evaluation = _read_json(paths.EVAL_METRICS)
    evaluate_run = _read_json(paths.EVAL_RUN)
    lr_find = _read_json(paths.LR_FIND_METRICS)
    training = _read_json(paths.TRAIN_SUMMARY)
    speed = _read_json(paths.TRAIN_SPEED)
    history = read_history()
    lrs = read_lr_schedule()
    finder_curve = read_lr_curve()
    for figure in COPIED_FIGURES:
        if not figure.is_file():
            stage = "train" if figure == paths.AUGMENT_PREVIEW else "evaluate"
            raise CifarlabError(f"report needs {figure}, which is missing; run `dvc repro {stage}`")
    checkpoint = read_checkpoint()
    classes = list(evaluation["per_class_accuracy"])
    matrix = read_confusion(classes)
    if int(matrix.sum()) != int(evaluation["test_images"]):
        raise CifarlabError(f"{paths.CONFUSION} has {int(matrix.sum())} rows but metrics/evaluate.json counts "
                            f"{evaluation['test_images']} test images; rerun `dvc repro evaluate`")
    dropout = checkpoint.get("dropout", 0.0)
    table, parameters = model_summary(checkpoint["arch"], checkpoint.get("num_classes", len(classes)), dropout)
    versions = _versions() | {"platform": platform.platform()}
    return RunSummary(
        report=params, identity=run_identity(environ), run=run_params(checkpoint["params"], evaluate_run, params),
        evaluation=evaluation, evaluate_run=evaluate_run, lr_find=lr_find, training=training, speed=speed,
        history=history, lrs=lrs, finder_curve=finder_curve, confusion=matrix, arch=checkpoint["arch"],
        parameters=parameters, dropout=dropout, model_source=model_spec(checkpoint["arch"]).source, model_table=table,
        last_epoch=checkpoint.get("epoch", len(history["train/loss"])), max_lr=float(checkpoint["max_lr"]),
        checkpoint_mb=paths.CHECKPOINT.stat().st_size / 1e6, versions=versions,
        figure_sources={figure.name: figure for figure in COPIED_FIGURES})

