"""reports/report.md, built only from what the other stages wrote.

Every number in the report is read from a metrics file or the checkpoint; every figure is either
copied from a stage's plots or drawn here from a stage's plot data.
"""

from __future__ import annotations

import csv
import json
import platform
import shutil
from importlib import metadata
from pathlib import Path

import yaml

from cifarlab import paths
from cifarlab.atomic import atomic_dir, save_figure
from cifarlab.errors import CifarlabError
from cifarlab.params import ReportParams
from cifarlab.plots import curves_figure, schedule_figure

LIBRARIES = ("torch", "torchvision", "albumentations", "torch-lr-finder", "dvc", "dvclive", "numpy")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
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
    if not history:
        raise CifarlabError(f"report needs the per-epoch metrics under {root}/; run `dvc repro train`")
    return history


def read_lr_schedule(path: Path = paths.LR_SCHEDULE) -> list[float]:
    with path.open() as handle:
        return [float(row["lr"]) for row in csv.DictReader(handle)]


def model_summary(arch: str) -> str:
    from torchinfo import summary

    from cifarlab.models import create_model

    stats = summary(create_model(arch), input_size=(1, 3, 32, 32), verbose=0,
                    col_names=("output_size", "num_params"), depth=3)
    return str(stats)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_report(params: ReportParams, out_dir: Path = paths.REPORT_DIR) -> Path:
    import torch

    evaluation = _read_json(paths.EVAL_METRICS)
    lr_find = _read_json(paths.LR_FIND_METRICS)
    speed = _read_json(paths.TRAIN_SPEED)
    history = read_history()
    lrs = read_lr_schedule()
    checkpoint = torch.load(paths.CHECKPOINT, map_location="cpu", weights_only=False)
    run = checkpoint["params"]
    epochs = len(history["train/loss"])
    steps_per_epoch = len(lrs) // epochs

    with atomic_dir(out_dir) as tmp:
        figures = tmp / "figures"
        figures.mkdir()
        for source in (paths.LR_FIND_FIGURE, paths.CONFUSION_FIGURE, paths.MISCLASSIFIED_FIGURE):
            shutil.copyfile(source, figures / source.name)
        save_figure(curves_figure(history), figures / "curves.png", dpi=120)
        save_figure(schedule_figure(lrs, steps_per_epoch, run["train"]["max_at_epoch"]),
                    figures / "lr_schedule.png", dpi=120)

        accuracy = evaluation["accuracy"]
        met = accuracy >= params.target_accuracy
        epoch_rows = [[str(e + 1), f"{history['lr'][e]:.3e}", f"{history['train/loss'][e]:.4f}",
                       _pct(history["train/accuracy"][e]), f"{history['test/loss'][e]:.4f}",
                       _pct(history["test/accuracy"][e])] for e in range(epochs)]
        class_rows = [[name, _pct(acc)] for name, acc in evaluation["per_class_accuracy"].items()]
        suggestion_rows = [[rule, f"{lr:.3e}", "chosen" if rule == lr_find["rule"] else ""]
                           for rule, lr in lr_find["suggestions"].items()]
        environment = {**{k: speed[k] for k in ("device", "precision", "channels_last", "num_workers", "threads")},
                       "platform": platform.platform(), **_versions()}
        sections = [
            f"# {params.title}",
            f"Preset: **{params.preset}**. Data source: **{evaluation['data_source']}** ({evaluation['test_images']} held-out test images). "
            f"Model: **{checkpoint['arch']}**, {epochs} epochs.",
            "## Result",
            _table(["metric", "value"], [
                ["test accuracy", _pct(accuracy)], ["test loss", f"{evaluation['loss']:.4f}"],
                ["target accuracy", _pct(params.target_accuracy)],
                ["target", "**met**" if met else "**not met**"]]),
            "## LR range test",
            f"Suggested max LR **{lr_find['max_lr']:.3e}** by rule `{lr_find['rule']}`; start LR "
            f"{lr_find['min_lr']:.3e}. The loss minimum was at {lr_find['loss_minimum_lr']:.3e} (never used: "
            f"training at the minimum diverges). Max LR used for training: **{checkpoint['max_lr']:.3e}** "
            f"({'from lr_find' if run['train']['max_lr'] == 'find' else 'set in params'}).",
            _table(["rule", "max LR", ""], suggestion_rows),
            "![LR range test](figures/lr_find.png)",
            "## LR schedule",
            f"OneCycle stepped every batch: {len(lrs)} steps, {steps_per_epoch} per epoch, peak at the end of "
            f"epoch {run['train']['max_at_epoch']}, from {lrs[0]:.3e} to a peak of {max(lrs):.3e}, ending at "
            f"{lrs[-1]:.3e}.",
            "![LR schedule](figures/lr_schedule.png)",
            "## Training curves",
            "![loss and accuracy per epoch](figures/curves.png)",
            "## Per-epoch log",
            _table(["epoch", "LR (end)", "train loss", "train acc", "test loss", "test acc"], epoch_rows),
            "## Per-class test accuracy",
            _table(["class", "accuracy"], class_rows),
            "## Confusion matrix",
            "![confusion matrix](figures/confusion.png)",
            "## Misclassified test images",
            "![misclassified](figures/misclassified.png)",
            "## Model",
            "```\n" + model_summary(checkpoint["arch"]) + "\n```",
            "## Environment and timing",
            _table(["", ""], [[k, str(v)] for k, v in environment.items()] + [
                ["training images/s (mean)", f"{speed['images_per_second']:.1f}"],
                ["epoch seconds (mean)", f"{speed['epoch_seconds_mean']:.1f}"]]),
            "## Params",
            "```yaml\n" + yaml.safe_dump(run, sort_keys=False) + "```",
        ]
        (tmp / "report.md").write_text("\n\n".join(sections) + "\n")
    return out_dir / "report.md"
