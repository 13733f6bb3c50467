"""reports/report.md, built only from what the other stages wrote.

Every number in the report is read from a metrics file, a plot-data file or the checkpoint; every
figure is either copied from a stage's plots or drawn here from a stage's plot data. The markdown
uses only relative links and GitHub tables, so it renders on GitHub as committed.
"""

from __future__ import annotations

import copy
import csv
import json
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from cifarlab import paths
from cifarlab.atomic import atomic_dir, save_figure
from cifarlab.errors import CifarlabError
from cifarlab.params import ReportParams
from cifarlab.plots import curves_figure, lr_find_figure, schedule_figure

LIBRARIES = ("torch", "torchvision", "numpy", "albumentations", "torch-lr-finder", "grad-cam", "torchinfo",
             "matplotlib", "dvc", "dvclive")
CIFAR10_SIZES = (50_000, 10_000)   # the official train / test split sizes (checked by the download stage)

# Figures copied as drawn by the evaluate stage.
COPIED_FIGURES = (paths.CONFUSION_FIGURE, paths.PER_CLASS_FIGURE, paths.MISCLASSIFIED_FIGURE,
                  paths.GRADCAM_FIGURE)

SECTIONS = ("Result", "Run", "LR range test", "LR schedule", "Training curves", "Per-epoch log",
            "Per-class test accuracy", "Confusion matrix", "Misclassified test images", "Grad-CAM",
            "Model", "Environment and wall times", "Params")


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
    missing = [name for name in ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr")
               if name not in history]
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

    from cifarlab.models import create_model

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


# --- formatting ---------------------------------------------------------------------------------

def pct(value: float) -> str:
    return f"{100 * value:.2f}%"


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


def _data_description(data: dict, source: str, test_images: int) -> str:
    if source == "synthetic":
        return (f"synthetic (offline, deterministic; seed {data['synthetic_seed']}): "
                f"{data['synthetic_train_size']:,} train / {test_images:,} test images")
    return (f"CIFAR-10 from {data['url']} (md5 {data['md5']}): {CIFAR10_SIZES[0]:,} train / "
            f"{test_images:,} test images")


def run_params(checkpoint_params: dict, evaluate_run: dict, report: ReportParams) -> dict:
    """The params the run used: train's resolved copy in the checkpoint, with the sections train does
    not read taken from the stages that do (evaluate records its own; report's are this stage's)."""
    run = copy.deepcopy(checkpoint_params)
    if "evaluate" in evaluate_run.get("params", {}):
        run["evaluate"] = evaluate_run["params"]["evaluate"]
    run["report"] = {"preset": report.preset, "target_accuracy": report.target_accuracy, "title": report.title}
    return run


# --- the report ---------------------------------------------------------------------------------

def build_report(params: ReportParams, out_dir: Path = paths.REPORT_DIR) -> Path:
    import torch

    evaluation = _read_json(paths.EVAL_METRICS)
    evaluate_run = _read_json(paths.EVAL_RUN)
    lr_find = _read_json(paths.LR_FIND_METRICS)
    speed = _read_json(paths.TRAIN_SPEED)
    history = read_history()
    lrs = read_lr_schedule()
    finder_lrs, finder_losses = read_lr_curve()
    if not paths.CHECKPOINT.exists():
        raise CifarlabError(f"report needs {paths.CHECKPOINT}; run `dvc repro train`")
    checkpoint = torch.load(paths.CHECKPOINT, map_location="cpu", weights_only=False)
    run = run_params(checkpoint["params"], evaluate_run, params)
    classes = list(evaluation["per_class_accuracy"])
    matrix = read_confusion(classes)
    test_images = int(evaluation["test_images"])
    if int(matrix.sum()) != test_images:
        raise CifarlabError(f"{paths.CONFUSION} has {int(matrix.sum())} rows but metrics/evaluate.json counts "
                            f"{test_images} test images; rerun `dvc repro evaluate`")
    epochs = len(history["train/loss"])
    steps_per_epoch = len(lrs) // epochs
    train = run["train"]
    max_lr_used = float(checkpoint["max_lr"])
    summary_text, parameter_count = model_summary(checkpoint["arch"], checkpoint.get("num_classes", len(classes)),
                                                  checkpoint.get("dropout", 0.0))
    from cifarlab.models import model_spec
    spec = model_spec(checkpoint["arch"])

    with atomic_dir(out_dir) as tmp:
        figures = tmp / "figures"
        figures.mkdir()
        for source in COPIED_FIGURES:
            shutil.copyfile(source, figures / source.name)
        from_find = train["max_lr"] == "find"
        save_figure(lr_find_figure(finder_lrs, finder_losses, lr_find["suggestions"], lr_find["rule"],
                                   lr_find["loss_minimum_lr"], lr_find["window"], max_lr_used, from_find),
                    figures / "lr_find.png", dpi=120)
        save_figure(curves_figure(history, params.target_accuracy), figures / "curves.png", dpi=120)
        save_figure(schedule_figure(lrs, steps_per_epoch, train["max_at_epoch"]), figures / "lr_schedule.png",
                    dpi=120)

        # Result
        accuracy = evaluation["accuracy"]
        met = accuracy >= params.target_accuracy
        result_rows = [["test accuracy", f"**{pct(accuracy)}** ({evaluation['correct']:,} / {test_images:,})"],
                       ["test loss (mean cross-entropy)", f"{evaluation['loss']:.4f}"]]
        tta = evaluation.get("tta_hflip")
        if tta is not None:
            result_rows += [["test accuracy, horizontal-flip TTA", f"{pct(tta['accuracy'])} "
                             f"({tta['correct']:,} / {test_images:,})"],
                            ["test loss, horizontal-flip TTA", f"{tta['loss']:.4f}"]]
        gap = 100 * (accuracy - params.target_accuracy)
        synthetic = evaluation["data_source"] == "synthetic"
        verdict = ("not judged: synthetic data (the target belongs to CIFAR-10)" if synthetic else
                   f"**{'met' if met else 'not met'}** ({gap:+.2f} points)")
        result_rows += [[f"target accuracy ({params.preset})", pct(params.target_accuracy)],
                        ["target", verdict]]
        result_text = (f"The target is judged on the plain test accuracy"
                       f"{' (the TTA figure is shown beside it, never instead of it)' if tta is not None else ''}. "
                       f"Test split only: {test_images:,} held-out images, never used to select or stop training; "
                       f"the model is the last epoch's ({checkpoint.get('epoch', epochs)}).")

        # Run
        run_rows = [
            ["preset", params.preset],
            ["data source", _data_description(run["data"], evaluation["data_source"], test_images)],
            ["model", f"`{checkpoint['arch']}`, {parameter_count:,} parameters, dropout "
                      f"{checkpoint.get('dropout', 0.0):g}; reproduces {spec.source}"],
            ["optimizer", f"{run['optim']['name']}, weight decay {run['optim']['weight_decay']:g}, label smoothing "
                          f"{run['optim']['label_smoothing']:g}"],
            ["training", f"{epochs} epochs x {steps_per_epoch} steps, batch {train['batch_size']}, OneCycle "
                         f"({train['anneal_strategy']}) peaking at epoch {train['max_at_epoch']}, max LR "
                         f"{max_lr_used:.3e} ({'lr_find' if train['max_lr'] == 'find' else 'params'})"],
            ["augmentation", ", ".join(f"{k} {v}" for k, v in run["augment"].items())],
            ["device / precision (train)", f"{speed.get('device', '?')} / {speed.get('precision', '?')}"],
            ["device / precision (evaluate)", f"{evaluate_run.get('device', '?')} / "
                                              f"{evaluate_run.get('precision', '?')}"],
        ]

        # LR range test
        suggestion_rows = [[f"`{rule}`", f"{lr:.3e}", "`lr_find.rule`" if rule == lr_find["rule"] else ""]
                           for rule, lr in lr_find["suggestions"].items()]
        suggestion_rows.append(["loss minimum (never used)", f"{lr_find['loss_minimum_lr']:.3e}", ""])
        suggestion_rows.append(["**chosen**: used for training", f"**{max_lr_used:.3e}**",
                                "from lr_find" if train["max_lr"] == "find" else "set in params (`train.max_lr`)"])

        # Per-epoch log
        epoch_seconds = speed.get("epoch_seconds") or []
        epoch_rows = []
        for e in range(epochs):
            test_acc = history["test/accuracy"][e]
            epoch_rows.append([
                str(e + 1), f"{history['lr'][e]:.3e}", f"{history['train/loss'][e]:.4f}",
                pct(history["train/accuracy"][e]), f"{history['test/loss'][e]:.4f}", pct(test_acc),
                f"{round(test_acc * test_images):,}/{test_images:,}",
                f"{epoch_seconds[e]:.1f}" if e < len(epoch_seconds) else ""])

        # Per-class
        totals, correct = matrix.sum(axis=1), np.diag(matrix)
        class_rows = []
        for i, name in enumerate(classes):
            others = matrix[i].copy()
            others[i] = 0
            confused = (f"{classes[int(others.argmax())]} ({int(others.max())})" if others.max() > 0 else "-")
            class_rows.append([name, f"{int(totals[i]):,}", f"{int(correct[i]):,}",
                               pct(evaluation["per_class_accuracy"][name]), confused])
        weakest = min(classes, key=lambda name: evaluation["per_class_accuracy"][name])

        # Environment and wall times
        env_keys = ("device", "precision", "channels_last", "num_workers", "threads")
        env_rows = [[key, str(speed.get(key, "")), str(evaluate_run.get(key, ""))] for key in env_keys]
        env_rows.append(["Grad-CAM", "", f"layer `{evaluate_run.get('gradcam_layer')}`, "
                                         f"{evaluate_run.get('gradcam_precision')} on {evaluate_run.get('gradcam_device')}"])
        eval_seconds = evaluate_run.get("seconds", {})
        train_total = sum(epoch_seconds) if epoch_seconds else None
        time_rows = [
            ["train", f"training passes, {epochs} epochs (sum of epoch times; excludes the per-epoch test pass)",
             _seconds(train_total)],
            ["train", "mean epoch", _seconds(speed.get("epoch_seconds_mean"))],
            ["train", "throughput", f"{speed['images_per_second']:.1f} images/s" if "images_per_second" in speed
             else "not recorded"],
            ["evaluate", f"test pass ({test_images:,} images)", _seconds(eval_seconds.get("plain"))],
            ["evaluate", "throughput", f"{evaluate_run['images_per_second']:.1f} images/s"
             if "images_per_second" in evaluate_run else "not recorded"],
        ]
        if "tta_hflip" in eval_seconds:
            time_rows.append(["evaluate", "test pass with horizontal-flip TTA", _seconds(eval_seconds["tta_hflip"])])
        time_rows += [["evaluate", f"Grad-CAM ({evaluate_run.get('gradcam_images', 0)} images x 2 classes)",
                       _seconds(eval_seconds.get("gradcam"))],
                      ["evaluate", "whole stage", _seconds(eval_seconds.get("total"))]]
        size_mb = paths.CHECKPOINT.stat().st_size / 1e6
        version_rows = [[name, version] for name, version in _versions().items()]
        version_rows.append(["platform", platform.platform()])

        gallery = evaluate_run.get("gallery_images", 0)
        cams = evaluate_run.get("gradcam_images", 0)
        mistakes = test_images - int(evaluation["correct"])
        contents = " | ".join(f"[{name}](#{_anchor(name)})" for name in SECTIONS)

        sections = [
            f"# {params.title}",
            f"Preset **{params.preset}**: `{checkpoint['arch']}` trained for {epochs} epochs on "
            f"**{evaluation['data_source']}** data reaches **{pct(accuracy)}** test accuracy against a target of "
            f"{pct(params.target_accuracy)} ("
            + ("not judged: the data is **synthetic**, and the target belongs to CIFAR-10, so this run says nothing "
               "about meeting it" if synthetic else f"**{'met' if met else 'not met'}**")
            + "). Generated by the `report` stage "
            f"from the pipeline's outputs; every number below is read from `metrics/`, `plots/` or the checkpoint.",
            contents,
            "## Result", _table(["metric", "value"], result_rows), result_text,
            "## Run", _table(["", ""], run_rows),
            "## LR range test",
            f"{lr_find['iterations']} mini-batches of the range test"
            f"{' (stopped once the smoothed loss had clearly turned up)' if lr_find.get('stopped_early') else ''}. "
            f"Every rule reads only the window from the trimmed start up to the smoothed-loss minimum "
            f"({lr_find['window'][0]:.2e} .. {lr_find['window'][1]:.2e}, shaded in the figure): past the minimum a "
            f"diverged network saturates and its loss can fall again, which says nothing about a good LR. The "
            f"`{lr_find['rule']}` rule (`lr_find.rule`) suggests **{lr_find['max_lr']:.3e}**; the loss minimum at "
            f"{lr_find['loss_minimum_lr']:.3e} is never used (training there diverges). Training used "
            f"**{max_lr_used:.3e}** ({'from lr_find' if from_find else 'set in params'}), start LR "
            f"{max_lr_used / train['div_factor']:.3e} = max / `train.div_factor`.",
            _table(["rule", "max LR", ""], suggestion_rows),
            _image("LR range test: loss against learning rate, each rule's suggestion and the LR used", "lr_find.png"),
            "## LR schedule",
            f"OneCycle stepped every batch: {len(lrs)} steps, {steps_per_epoch} per epoch, from {lrs[0]:.3e} up to a "
            f"peak of {max(lrs):.3e} at the last batch of epoch {train['max_at_epoch']} (step {lrs.index(max(lrs)) + 1}),"
            f" ending at {lrs[-1]:.3e}.",
            _image("learning rate of every batch", "lr_schedule.png"),
            "## Training curves",
            "Train figures are the running mean over each epoch's augmented batches; test figures are measured on the "
            "held-out split after each epoch (for the curves only).",
            _image("loss and accuracy per epoch, train and test", "curves.png"),
            "## Per-epoch log",
            _table(["epoch", "LR (end)", "train loss", "train acc", "test loss", "test acc", "test correct",
                    "epoch s"], epoch_rows),
            "## Per-class test accuracy",
            f"Weakest class: **{weakest}** ({pct(evaluation['per_class_accuracy'][weakest])}).",
            _table(["class", "test images", "correct", "accuracy", "most often predicted instead (count)"],
                   class_rows),
            _image("per-class test accuracy", paths.PER_CLASS_FIGURE.name),
            "## Confusion matrix",
            "Rows are the true class, columns the predicted class; numbers are counts, colour is the share of the "
            "true class. The same data is the DVC confusion plot `plots/confusion.csv`.",
            _image("confusion matrix of the test split", paths.CONFUSION_FIGURE.name),
            "## Misclassified test images",
            f"The {gallery} most confident of the {mistakes:,} mistakes (`evaluate.gallery_size`), with the true "
            f"class, the predicted class and the model's confidence in it.",
            _image("misclassified test images", paths.MISCLASSIFIED_FIGURE.name),
            "## Grad-CAM",
            f"Grad-CAM at layer `{evaluate_run.get('gradcam_layer')}` (the model registry's choice for "
            f"`{checkpoint['arch']}`) for the {cams} most confident mistakes (`evaluate.gradcam_size`): for each image, "
            f"where the evidence for the predicted class lies, and where the model looked for the true class. "
            f"Computed in {evaluate_run.get('gradcam_precision')} on {evaluate_run.get('gradcam_device')}.",
            _image("Grad-CAM heat maps of misclassified test images", paths.GRADCAM_FIGURE.name),
            "## Model",
            f"`{checkpoint['arch']}`: {parameter_count:,} parameters; reproduces {spec.source}. Checkpoint "
            f"`{paths.CHECKPOINT.as_posix()}` is {size_mb:.1f} MB. Inputs are uint8-range images; the CIFAR-10 "
            f"normalisation is the model's first layer (not shown).",
            "```\n" + summary_text + "\n```",
            "## Environment and wall times",
            _table(["runtime", "train", "evaluate"], env_rows),
            _table(["stage", "what", "wall time"], time_rows),
            "Library versions and platform of the environment that generated this report:",
            _table(["library", "version"], version_rows),
            "## Params",
            "As the run used them: the sections train reads from the checkpoint, `evaluate` as the evaluate stage "
            "recorded it, `report` from this stage.",
            "```yaml\n" + yaml.safe_dump(run, sort_keys=False) + "```",
        ]
        (tmp / "report.md").write_text("\n\n".join(sections) + "\n")
    return out_dir / "report.md"
