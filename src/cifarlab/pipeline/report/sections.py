"""The report's markdown, one section at a time, from a `RunSummary` (`summary.py`) alone.

Each section is one small function that takes the summary and the report's figures folder, draws or
copies its figure if it has one, and returns its markdown. `@section` registers the sections in the
order they are defined below, which is their order in the report: headings, order and the contents
line (`header`) all come from these functions, and each can be rendered alone. The markdown uses
only relative links and GitHub tables, so it renders on GitHub as committed.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import yaml

from cifarlab import paths
from cifarlab.atomic import save_figure
from cifarlab.config.params import TTA_LABELS
from cifarlab.data.storage import CIFAR10_TEST_SIZE, CIFAR10_TRAIN_SIZE
from cifarlab.pipeline.plots import curves_figure, lr_find_figure, lr_find_not_run_figure, schedule_figure
from cifarlab.pipeline.report.summary import RunSummary


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
    if not s.judged:
        return "not judged: synthetic data (the target belongs to CIFAR-10)"
    met = s.accuracy >= s.report.target_accuracy
    return f"**{'met' if met else 'not met'}** ({100 * (s.accuracy - s.report.target_accuracy):+.2f} points)"


def _time_to_target(s: RunSummary) -> str:
    """When the per-epoch test accuracy first reached the target, in cumulative training seconds
    (plots/time_to_accuracy.csv, the plot "Test accuracy vs training time")."""
    if not s.judged:
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
    judged = (_verdict(s) if s.judged else "not judged: the data is **synthetic**, and the target belongs to CIFAR-10, "
              "so this run says nothing about meeting it")
    reported = report.writeup_accuracy
    writeup = ("Its write-up states no test accuracy." if reported is None else
               f"Its write-up reported {quoted_pct(reported)}{' on CIFAR-10' if s.synthetic else ''}.")
    main = " | ".join(f"[{x.title}](#{x.anchor})" for x in SECTIONS if not x.appendix)
    appendix = " | ".join(f"[{x.title}](#{x.anchor})" for x in SECTIONS if x.appendix)
    return "\n\n".join([
        f"# {report.title.replace('{epochs}', str(s.training['epochs']))}",   # the epochs that ran, not the preset's
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
    tta = [name for name in TTA_LABELS if name in evaluation]
    for name in tta:
        figures_, label = evaluation[name], TTA_LABELS[name]
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
    found, start = s.lr_find, f"start LR {s.lrs[0]:.3e} (the first batch's: max / `train.div_factor`)"
    if not s.range_test_ran:
        save_figure(lr_find_not_run_figure(s.max_lr), figures / "lr_find.png", dpi=120)
        return (f"Not run: `train.max_lr` is a number, so nothing uses the range test (`lr_find.when: find`). Training "
                f"used **{s.max_lr:.3e}** (set by `train.max_lr`), {start}. To run the range test anyway, set "
                f"`lr_find.when: always` (`dvc exp run -S lr_find.when=always`); to train at its suggestion, "
                f"`train.max_lr: find`.\n\n" + _image("LR range test: not run", "lr_find.png"))
    minimum, at_end = found["loss_minimum_lr"], found.get("minimum_at_end", False)
    save_figure(lr_find_figure(*s.finder_curve, found["suggestions"], found["rule"], minimum, found["window"],
                               s.max_lr, s.from_find, minimum_at_end=at_end), figures / "lr_find.png", dpi=120)
    rows = [[f"`{rule}`", f"{lr:.3e}", "`lr_find.rule`" if rule == found["rule"] else ""]
            for rule, lr in found["suggestions"].items()]
    rows.append(["lowest point: the sweep's end" if at_end else "loss minimum (never used)", f"{minimum:.3e}", ""])
    rows.append(["**chosen**: used for training", f"**{s.max_lr:.3e}**",
                 "from lr_find" if s.from_find else "set in params (`train.max_lr`)"])
    ending = (f"the curve still falls at the end of the sweep: its lowest point, at {minimum:.3e}, is only where the "
              f"sweep ended, not where the loss turns up, so the rules may answer low: raise `lr_find.end_lr`" if at_end
              else f"the loss minimum at {minimum:.3e} is never used (training there diverges)")
    used = (f" (lr_find's `{found['rule']}` suggestion)" if s.from_find else
            f", {'above' if s.max_lr > minimum else 'below' if s.max_lr < minimum else 'at'} the range test's "
            f"{'lowest point' if at_end else 'loss minimum'} at {minimum:.3e} (set by `train.max_lr`)")
    return "\n\n".join([
        f"{found['iterations']} mini-batches of the range test"
        f"{' (stopped once the smoothed loss had clearly turned up)' if found.get('stopped_early') else ''}. "
        f"Every rule reads only the window from the trimmed start up to the smoothed-loss minimum "
        f"({found['window'][0]:.2e} .. {found['window'][1]:.2e}, shaded in the figure): past the minimum a "
        f"diverged network saturates and its loss can fall again, which says nothing about a good LR. The "
        f"`{found['rule']}` rule (`lr_find.rule`) suggests **{found['max_lr']:.3e}**; {ending}. Training used "
        f"**{s.max_lr:.3e}**{used}, {start}.",
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
    target_line = s.report.target_accuracy if s.judged else None      # no line where the text says "not judged"
    save_figure(curves_figure(s.history, target_line, train_augmented=augmented), figures / "curves.png", dpi=120)
    batches = "augmented batches" if augmented else "batches (not augmented: see [Augmentation](#augmentation))"
    target = "the dashed line is the target" if s.judged else "no target line: not judged (see [Result](#result))"
    return "\n\n".join([
        f"Train figures are the running mean over each epoch's {batches}; test figures are measured on the "
        f"held-out split after each epoch (for the curves only); {target}.",
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
    time_rows += [["evaluate", f"test pass with {TTA_LABELS[name]}", _seconds(seconds[name])]
                  for name in TTA_LABELS if name in seconds]
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
