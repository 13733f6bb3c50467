"""reports/report.md, built only from what the other stages wrote.

`read_summary` reads every file the report uses, once, into a `RunSummary`. Each section is one
small function that takes the summary and the report's figures folder, draws or copies its figure
if it has one, and returns its markdown. `@section` registers the sections in the order they are
defined below, which is their order in the report: headings, order and the contents line all come
from these functions, and each can be rendered alone. The markdown uses only relative links and
GitHub tables, so it renders on GitHub as committed.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import yaml

from cifarlab import paths
from cifarlab.atomic import atomic_dir, save_figure
from cifarlab.config.params import FIND, AugmentParams, ReportParams
from cifarlab.data.storage import CIFAR10_TEST_SIZE, CIFAR10_TRAIN_SIZE
from cifarlab.engine.metrics import TTA_VARIANTS
from cifarlab.errors import CifarlabError
from cifarlab.pipeline.plots import curves_figure, lr_find_figure, schedule_figure

LIBRARIES = ("torch", "torchvision", "numpy", "albumentations", "torch-lr-finder", "grad-cam", "torchinfo",
             "matplotlib", "dvc", "dvclive")

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
    rows = _read_csv(path)
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
    lr_find: dict                              # metrics/lr_find.json
    speed: dict                                # metrics/train_speed.json
    history: dict[str, list[float]]            # per-epoch series (`read_history`)
    lrs: list[float]                           # the LR of every batch
    finder_curve: tuple[list[float], list[float]]   # the range test's (lr, smoothed loss)
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


def read_summary(params: ReportParams, environ: Mapping[str, str] = os.environ) -> RunSummary:
    """Read every output the report uses, once; a missing or inconsistent one is a one-line error."""
    import torch

    from cifarlab.models.registry import model_spec

    evaluation = _read_json(paths.EVAL_METRICS)
    evaluate_run = _read_json(paths.EVAL_RUN)
    lr_find = _read_json(paths.LR_FIND_METRICS)
    speed = _read_json(paths.TRAIN_SPEED)
    history = read_history()
    lrs = read_lr_schedule()
    finder_curve = read_lr_curve()
    for figure in COPIED_FIGURES:
        if not figure.is_file():
            stage = "train" if figure == paths.AUGMENT_PREVIEW else "evaluate"
            raise CifarlabError(f"report needs {figure}, which is missing; run `dvc repro {stage}`")
    if not paths.CHECKPOINT.exists():
        raise CifarlabError(f"report needs {paths.CHECKPOINT}; run `dvc repro train`")
    checkpoint = torch.load(paths.CHECKPOINT, map_location="cpu", weights_only=False)
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
        evaluation=evaluation, evaluate_run=evaluate_run, lr_find=lr_find, speed=speed, history=history, lrs=lrs,
        finder_curve=finder_curve, confusion=matrix, arch=checkpoint["arch"], parameters=parameters,
        dropout=dropout, model_source=model_spec(checkpoint["arch"]).source, model_table=table,
        last_epoch=checkpoint.get("epoch", len(history["train/loss"])), max_lr=float(checkpoint["max_lr"]),
        checkpoint_mb=paths.CHECKPOINT.stat().st_size / 1e6, versions=versions,
        figure_sources={figure.name: figure for figure in COPIED_FIGURES})


# --- formatting ---------------------------------------------------------------------------------

def pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def quoted_pct(value: float) -> str:
    """A figure quoted from a write-up, with no more digits than it gave: 0.82 -> 82%, 0.9264 -> 92.64%."""
    return f"{100 * value:.2f}".rstrip("0").rstrip(".") + "%"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "not recorded"
    if value >= 120:
        return f"{value:.0f} s ({value / 60:.1f} min)"
    return f"{value:.2f} s"


def _image(alt: str, name: str) -> str:
    return f"![{alt}](figures/{name})"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, spaces to dashes, punctuation dropped."""
    return "".join(c for c in heading.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def _copied(s: RunSummary, name: str, figures: Path) -> str:
    """Copy a stage's figure into the report's figures folder; its file name."""
    shutil.copyfile(s.figure_sources[name], figures / name)
    return name


def _data_description(data: dict, source: str) -> str:
    """Where the data came from and how many images each stage used (a subset says of how many)."""
    if source == "synthetic":
        whole_train, whole_test = data["synthetic_train_size"], data["synthetic_test_size"]
        origin = f"synthetic (offline, deterministic; seed {data['synthetic_seed']})"
    else:
        (whole_train, whole_test), origin = (CIFAR10_TRAIN_SIZE, CIFAR10_TEST_SIZE), f"CIFAR-10 from {data['url']} (md5 {data['md5']})"
    train = _split_size(data.get("train_subset", 0), whole_train, "train_subset")
    test = _split_size(data.get("test_subset", 0), whole_test, "test_subset")
    return f"{origin}: {train} train / {test} test images"


def _split_size(used: int, whole: int, key: str) -> str:
    return f"{whole:,}" if not used else f"{used:,} of {whole:,} (`data.{key}`)"


def _verdict(s: RunSummary) -> str:
    if s.synthetic:
        return "not judged: synthetic data (the target belongs to CIFAR-10)"
    met = s.accuracy >= s.report.target_accuracy
    return f"**{'met' if met else 'not met'}** ({100 * (s.accuracy - s.report.target_accuracy):+.2f} points)"


def _time_to_target(s: RunSummary) -> str:
    """When the per-epoch test accuracy first reached the target, in cumulative training seconds
    (plots/time_to_accuracy.csv, the plot "Test accuracy vs training time")."""
    if s.synthetic:
        return "not judged: synthetic data"
    seconds = list(itertools.accumulate(s.speed.get("epoch_seconds") or []))
    target = s.report.target_accuracy
    for epoch, (accuracy, elapsed) in enumerate(zip(s.history["test/accuracy"], seconds), start=1):
        if accuracy >= target:
            return f"epoch {epoch}, after {_seconds(elapsed)} of training"
    total = f" in {_seconds(seconds[-1])} of training" if seconds else ""
    return f"not reached{total} (best {pct(max(s.history['test/accuracy']))})"


def _writeup(s: RunSummary) -> str:
    reported = s.report.writeup_accuracy
    if reported is None:
        return "none stated (`report.writeup_accuracy` is null)"
    if s.synthetic:
        return f"{quoted_pct(reported)} on CIFAR-10 (not comparable: this run's data is synthetic)"
    return f"{quoted_pct(reported)} (this run: {100 * (s.accuracy - reported):+.2f} points)"


# --- the sections, in report order --------------------------------------------------------------

@dataclass(frozen=True)
class Section:
    title: str
    render: Callable[[RunSummary, Path], str]   # (summary, figures folder) -> the markdown under the heading
    appendix: bool = False

    @property
    def heading(self) -> str:
        return f"Appendix: {self.title}" if self.appendix else self.title

    @property
    def anchor(self) -> str:
        return _anchor(self.heading)


SECTIONS: list[Section] = []


def section(title: str, appendix: bool = False) -> Callable:
    """Register the decorated function as the next section of the report."""
    def register(render: Callable[[RunSummary, Path], str]) -> Callable[[RunSummary, Path], str]:
        added = Section(title, render, appendix)
        if any(existing.heading == added.heading for existing in SECTIONS):
            raise ValueError(f"two report sections are headed {added.heading!r}")
        SECTIONS.append(added)
        return render
    return register


def header(s: RunSummary) -> str:
    """The first screen: the title, which run this is, the result in one paragraph, the contents."""
    report = s.report
    judged = ("not judged: the data is **synthetic**, and the target belongs to CIFAR-10, so this run says nothing "
              "about meeting it" if s.synthetic else _verdict(s))
    reported = report.writeup_accuracy
    writeup = ("Its write-up states no test accuracy." if reported is None else
               f"Its write-up reported {quoted_pct(reported)}{' on CIFAR-10' if s.synthetic else ''}.")
    main = " | ".join(f"[{x.title}](#{x.anchor})" for x in SECTIONS if not x.appendix)
    appendix = " | ".join(f"[{x.title}](#{x.anchor})" for x in SECTIONS if x.appendix)
    return "\n\n".join([
        f"# {report.title}",
        f"Run: {s.identity.describe()}.",
        f"Preset **{report.preset}**{_budget_note(s)}: `{s.arch}` trained for {s.epochs} epochs on **{s.evaluation['data_source']}** "
        f"data reaches **{pct(s.accuracy)}** test accuracy against a target of {pct(report.target_accuracy)} "
        f"({judged}). {writeup} Generated by the `report` stage from the pipeline's outputs; every number below is "
        f"read from `metrics/`, `plots/` or the checkpoint.",
        f"{main}<br>Appendix: {appendix}" if appendix else main,
    ])


def _budget_note(s: RunSummary) -> str:
    """Names a budget other than the full one: its accuracy is a smoke run's, not the assignment's."""
    return "" if s.budget == "full" else f" at budget **{s.budget}** (a cut-down run: `conf/budget/{s.budget}.yaml`)"


@section("Result")
def result(s: RunSummary, figures: Path) -> str:
    n, evaluation = s.test_images, s.evaluation
    rows = [["test accuracy", f"**{pct(s.accuracy)}** ({evaluation['correct']:,} / {n:,})"],
            ["test loss (mean cross-entropy)", f"{evaluation['loss']:.4f}"]]
    tta = [name for name in TTA_VARIANTS if name in evaluation]
    for name in tta:
        figures_, label = evaluation[name], TTA_VARIANTS[name].LABEL
        rows += [[f"test accuracy, {label}", f"{pct(figures_['accuracy'])} ({figures_['correct']:,} / {n:,})"],
                 [f"test loss, {label}", f"{figures_['loss']:.4f}"]]
    rows += [[f"target accuracy ({s.report.preset})", pct(s.report.target_accuracy)],
             ["target", _verdict(s)],
             ["time to the target", _time_to_target(s)],
             ["the write-up's own result", _writeup(s)]]
    return "\n\n".join([
        _table(["metric", "value"], rows),
        f"The target is judged on the plain test accuracy"
        f"{' (the TTA figures are shown beside it, never instead of it)' if tta else ''}. "
        f"Test split only: {n:,} held-out images, never used to select or stop training; the model is the last "
        f"epoch's ({s.last_epoch}). The last row is quoted from the assignment's write-up "
        f"(`report.writeup_accuracy`), not measured here."])


@section("Run")
def run_table(s: RunSummary, figures: Path) -> str:
    optim, train = s.run["optim"], s.train
    rows = [
        ["preset", s.report.preset],
        ["budget", f"{s.budget} (`conf/budget/{s.budget}.yaml`)"],
        ["data source", _data_description(s.run["data"], s.evaluation["data_source"])],
        ["model", f"`{s.arch}`, {s.parameters:,} parameters, dropout {s.dropout:g}; reproduces {s.model_source}"],
        ["optimizer", f"{optim['name']}, weight decay {optim['weight_decay']:g}, label smoothing "
                      f"{optim['label_smoothing']:g}"],
        ["training", f"{s.epochs} epochs x {s.steps_per_epoch} steps, batch {train['batch_size']}, OneCycle "
                     f"({train['anneal_strategy']}) peaking at epoch {train['max_at_epoch']}, max LR "
                     f"{s.max_lr:.3e} ({'lr_find' if s.from_find else 'params'})"],
        ["augmentation", s.augment.describe()],
        ["device / precision (train)", f"{s.speed.get('device', '?')} / {s.speed.get('precision', '?')}"],
        ["device / precision (evaluate)", f"{s.evaluate_run.get('device', '?')} / "
                                          f"{s.evaluate_run.get('precision', '?')}"],
    ]
    return _table(["", ""], rows)


@section("Augmentation")
def augmentation(s: RunSummary, figures: Path) -> str:
    name = _copied(s, paths.AUGMENT_PREVIEW.name, figures)
    augment = s.augment
    if augment.steps():
        text = (f"Every training image goes through {augment.describe()} (`augment.*`), drawn anew each time it "
                f"is loaded; test images never are. The figure, drawn by the train stage, shows the same training "
                f"images as stored (top row) and in a few random draws of that transform, seeded with `train.seed` "
                f"= {s.train['seed']} (the batches training saw drew their own).")
        alt = "training images as stored and after random draws of the training augmentation"
    else:
        text = (f"No augmentation: {augment.switched_off()}, so training sees every image as stored (the figure, "
                f"drawn by the train stage, shows a few of them once).")
        alt = "training images as stored: no augmentation configured"
    return "\n\n".join([text, _image(alt, name)])


@section("LR range test")
def lr_range_test(s: RunSummary, figures: Path) -> str:
    found = s.lr_find
    save_figure(lr_find_figure(*s.finder_curve, found["suggestions"], found["rule"], found["loss_minimum_lr"],
                               found["window"], s.max_lr, s.from_find), figures / "lr_find.png", dpi=120)
    rows = [[f"`{rule}`", f"{lr:.3e}", "`lr_find.rule`" if rule == found["rule"] else ""]
            for rule, lr in found["suggestions"].items()]
    rows.append(["loss minimum (never used)", f"{found['loss_minimum_lr']:.3e}", ""])
    rows.append(["**chosen**: used for training", f"**{s.max_lr:.3e}**",
                 "from lr_find" if s.from_find else "set in params (`train.max_lr`)"])
    return "\n\n".join([
        f"{found['iterations']} mini-batches of the range test"
        f"{' (stopped once the smoothed loss had clearly turned up)' if found.get('stopped_early') else ''}. "
        f"Every rule reads only the window from the trimmed start up to the smoothed-loss minimum "
        f"({found['window'][0]:.2e} .. {found['window'][1]:.2e}, shaded in the figure): past the minimum a "
        f"diverged network saturates and its loss can fall again, which says nothing about a good LR. The "
        f"`{found['rule']}` rule (`lr_find.rule`) suggests **{found['max_lr']:.3e}**; the loss minimum at "
        f"{found['loss_minimum_lr']:.3e} is never used (training there diverges). Training used "
        f"**{s.max_lr:.3e}** ({'from lr_find' if s.from_find else 'set in params'}), start LR "
        f"{s.lrs[0]:.3e} (the first batch's: max / `train.div_factor`).",
        _table(["rule", "max LR", ""], rows),
        _image("LR range test: loss against learning rate, each rule's suggestion and the LR used", "lr_find.png")])


@section("LR schedule")
def lr_schedule(s: RunSummary, figures: Path) -> str:
    lrs, peak_epoch = s.lrs, s.train["max_at_epoch"]
    save_figure(schedule_figure(lrs, s.steps_per_epoch, peak_epoch), figures / "lr_schedule.png", dpi=120)
    return "\n\n".join([
        f"OneCycle stepped every batch: {len(lrs)} steps, {s.steps_per_epoch} per epoch, from {lrs[0]:.3e} up to a "
        f"peak of {max(lrs):.3e} at the last batch of epoch {peak_epoch} (step {lrs.index(max(lrs)) + 1}), "
        f"ending at {lrs[-1]:.3e}.",
        _image("learning rate of every batch", "lr_schedule.png")])


@section("Training curves")
def training_curves(s: RunSummary, figures: Path) -> str:
    augmented = bool(s.augment.steps())
    save_figure(curves_figure(s.history, s.report.target_accuracy, train_augmented=augmented),
                figures / "curves.png", dpi=120)
    batches = "augmented batches" if augmented else "batches (not augmented: see [Augmentation](#augmentation))"
    return "\n\n".join([
        f"Train figures are the running mean over each epoch's {batches}; test figures are measured on the "
        f"held-out split after each epoch (for the curves only).",
        _image("loss and accuracy per epoch, train and test", "curves.png")])


@section("Per-epoch log")
def per_epoch_log(s: RunSummary, figures: Path) -> str:
    history, n = s.history, s.test_images
    epoch_seconds = s.speed.get("epoch_seconds") or []
    rows = []
    for e in range(s.epochs):
        test_acc = history["test/accuracy"][e]
        rows.append([str(e + 1), f"{history['lr'][e]:.3e}", f"{history['train/loss'][e]:.4f}",
                     pct(history["train/accuracy"][e]), f"{history['test/loss'][e]:.4f}", pct(test_acc),
                     f"{round(test_acc * n):,}/{n:,}", f"{epoch_seconds[e]:.1f}" if e < len(epoch_seconds) else ""])
    return _table(["epoch", "LR (end)", "train loss", "train acc", "test loss", "test acc", "test correct",
                   "epoch s"], rows)


@section("Per-class test accuracy")
def per_class(s: RunSummary, figures: Path) -> str:
    matrix, classes, accuracy = s.confusion, s.classes, s.evaluation["per_class_accuracy"]
    totals, correct = matrix.sum(axis=1), np.diag(matrix)
    rows = []
    for i, name in enumerate(classes):
        others = matrix[i].copy()
        others[i] = 0
        confused = f"{classes[int(others.argmax())]} ({int(others.max())})" if others.max() > 0 else "-"
        rows.append([name, f"{int(totals[i]):,}", f"{int(correct[i]):,}", pct(accuracy[name]), confused])
    weakest = min(classes, key=lambda name: accuracy[name])
    return "\n\n".join([
        f"Weakest class: **{weakest}** ({pct(accuracy[weakest])}).",
        _table(["class", "test images", "correct", "accuracy", "most often predicted instead (count)"], rows),
        _image("per-class test accuracy", _copied(s, paths.PER_CLASS_FIGURE.name, figures))])


@section("Confusion matrix")
def confusion_matrix(s: RunSummary, figures: Path) -> str:
    return "\n\n".join([
        "Rows are the true class, columns the predicted class; numbers are counts, colour is the share of the "
        "true class. The same data is the DVC confusion plot `plots/confusion.csv`.",
        _image("confusion matrix of the test split", _copied(s, paths.CONFUSION_FIGURE.name, figures))])


@section("Misclassified test images")
def misclassified(s: RunSummary, figures: Path) -> str:
    mistakes = s.test_images - int(s.evaluation["correct"])
    return "\n\n".join([
        f"The {s.evaluate_run.get('gallery_images', 0)} most confident of the {mistakes:,} mistakes "
        f"(`evaluate.gallery_size`), with the true class, the predicted class and the model's confidence in it.",
        _image("misclassified test images", _copied(s, paths.MISCLASSIFIED_FIGURE.name, figures))])


@section("Grad-CAM")
def grad_cam(s: RunSummary, figures: Path) -> str:
    return "\n\n".join([
        f"Grad-CAM at layer `{s.evaluate_run.get('gradcam_layer')}` (the model registry's choice for `{s.arch}`) "
        f"for the {s.evaluate_run.get('gradcam_images', 0)} most confident mistakes (`evaluate.gradcam_size`): for "
        f"each image, where the evidence for the predicted class lies, and where the model looked for the true "
        f"class. Computed in {s.evaluate_run.get('gradcam_precision')} on {s.evaluate_run.get('gradcam_device')}.",
        _image("Grad-CAM heat maps of misclassified test images", _copied(s, paths.GRADCAM_FIGURE.name, figures))])


@section("Environment and wall times")
def environment(s: RunSummary, figures: Path) -> str:
    speed, record, n = s.speed, s.evaluate_run, s.test_images
    keys = ("device", "precision", "channels_last", "num_workers", "threads")
    runtime_rows = [[key, str(speed.get(key, "")), str(record.get(key, ""))] for key in keys]
    runtime_rows.append(["Grad-CAM", "", f"layer `{record.get('gradcam_layer')}`, "
                                         f"{record.get('gradcam_precision')} on {record.get('gradcam_device')}"])
    epoch_seconds = speed.get("epoch_seconds") or []
    seconds = record.get("seconds", {})
    time_rows = [
        ["train", f"training passes, {s.epochs} epochs (sum of epoch times; excludes the per-epoch test pass)",
         _seconds(sum(epoch_seconds) if epoch_seconds else None)],
        ["train", "mean epoch", _seconds(speed.get("epoch_seconds_mean"))],
        ["train", "throughput", f"{speed['images_per_second']:.1f} images/s" if "images_per_second" in speed
         else "not recorded"],
        ["evaluate", f"test pass ({n:,} images)", _seconds(seconds.get("plain"))],
        ["evaluate", "throughput", f"{record['images_per_second']:.1f} images/s" if "images_per_second" in record
         else "not recorded"],
    ]
    time_rows += [["evaluate", f"test pass with {TTA_VARIANTS[name].LABEL}", _seconds(seconds[name])]
                  for name in TTA_VARIANTS if name in seconds]
    time_rows += [["evaluate", f"Grad-CAM ({record.get('gradcam_images', 0)} images x 2 classes)",
                   _seconds(seconds.get("gradcam"))],
                  ["evaluate", "whole stage", _seconds(seconds.get("total"))]]
    return "\n\n".join([_table(["runtime", "train", "evaluate"], runtime_rows),
                         _table(["stage", "what", "wall time"], time_rows)])


@section("model summary", appendix=True)
def appendix_model(s: RunSummary, figures: Path) -> str:
    return "\n\n".join([
        f"`{s.arch}`: {s.parameters:,} parameters; reproduces {s.model_source}. Checkpoint "
        f"`{paths.CHECKPOINT.as_posix()}` is {s.checkpoint_mb:.1f} MB. Inputs are uint8-range images; the CIFAR-10 "
        f"normalisation is the model's first layer (not shown).",
        "```\n" + s.model_table + "\n```"])


@section("library versions", appendix=True)
def appendix_versions(s: RunSummary, figures: Path) -> str:
    return "\n\n".join(["Library versions and platform of the environment that generated this report:",
                         _table(["library", "version"], [[name, version] for name, version in s.versions.items()])])


@section("params", appendix=True)
def appendix_params(s: RunSummary, figures: Path) -> str:
    return "\n\n".join([
        "As the run used them: the sections train reads from the checkpoint, `evaluate` as the evaluate stage "
        "recorded it, `report` from this stage.",
        "```yaml\n" + yaml.safe_dump(s.run, sort_keys=False) + "```"])


# --- the report ---------------------------------------------------------------------------------

def render(s: RunSummary, figures: Path) -> str:
    """The whole markdown: the header, then every section under its heading; figures go to `figures`."""
    parts = [header(s)]
    for part in SECTIONS:
        parts += [f"## {part.heading}", part.render(s, figures)]
    return "\n\n".join(parts) + "\n"


def build_report(params: ReportParams, out_dir: Path = paths.REPORT_DIR) -> Path:
    summary = read_summary(params)
    with atomic_dir(out_dir) as tmp:
        figures = tmp / "figures"
        figures.mkdir()
        (tmp / "report.md").write_text(render(summary, figures))
    return out_dir / "report.md"
