"""The train stage's work: resolve the max LR, build everything from params, run the epochs, log.

The test split is measured after every epoch for the curves only; nothing is selected or stopped
on it, and the saved model is the last epoch's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Union

import torch
from dvclive import Live
from tqdm import tqdm

from cifarlab import paths
from cifarlab.atomic import atomic_path, write_json
from cifarlab.augment import build_train_transform
from cifarlab.checkpoint import save_checkpoint
from cifarlab.data import Dataset, iterate_batches
from cifarlab.engine import Runtime, build_model, evaluate, seed_everything, train_loader, train_one_epoch
from cifarlab.errors import CifarlabError
from cifarlab.params import Params
from cifarlab.schedule import build_optimizer, build_scheduler, onecycle_for


def resolve_max_lr(max_lr: Union[float, str], lr_find_metrics: Path = paths.LR_FIND_METRICS) -> float:
    """`train.max_lr` as a number: itself, or lr_find's suggestion when it is `find`."""
    if max_lr != "find":
        return float(max_lr)
    try:
        suggested = json.loads(lr_find_metrics.read_text())["max_lr"]
    except (OSError, ValueError, KeyError):
        raise CifarlabError(f"train.max_lr is `find` but {lr_find_metrics} is missing or has no max_lr; "
                            f"run `dvc repro lr_find` or set train.max_lr to a number") from None
    return float(suggested)


def fit(params: Params, dataset: Dataset, runtime: Runtime) -> dict:
    """Train for `train.epochs` epochs and write the checkpoint, dvclive metrics, speed and LR log."""
    train = params.train
    max_lr = resolve_max_lr(train.max_lr)
    seed_everything(train.seed)
    loader = train_loader(dataset.train, build_train_transform(params.augment), train.batch_size, train.seed,
                          runtime)
    model = build_model(params.model, runtime, len(dataset.classes))
    optimizer = build_optimizer(model, params.optim, lr=max_lr / train.div_factor)
    cycle = onecycle_for(train, len(loader), max_lr)
    scheduler = build_scheduler(optimizer, cycle, train.cycle_momentum)
    scaler = torch.amp.GradScaler("cuda") if runtime.needs_grad_scaler() else None

    print(f"train: {params.model.name} on {len(dataset.train)} {dataset.source} images, "
          f"{train.epochs} epochs x {len(loader)} steps, max_lr {max_lr:.3g} "
          f"({'lr_find' if train.max_lr == 'find' else 'params'}), {runtime.device} {runtime.precision}")
    all_lrs: list[float] = []
    epoch_seconds: list[float] = []
    images_per_second: list[float] = []
    with Live(str(paths.TRAIN_LIVE_DIR), dvcyaml=False, save_dvc_exp=False) as live:
        for epoch in range(1, train.epochs + 1):
            started = time.perf_counter()
            with tqdm(total=len(loader), desc=f"epoch {epoch}/{train.epochs}", leave=False) as bar:
                result = train_one_epoch(model, loader.epoch(epoch), optimizer, scheduler, runtime,
                                         params.optim.label_smoothing, scaler, bar)
            seconds = time.perf_counter() - started
            test = evaluate(model, iterate_batches(dataset.test, params.evaluate.batch_size), runtime)
            all_lrs += result["lrs"]
            epoch_seconds.append(seconds)
            images_per_second.append(result["images"] / seconds)
            live.step = epoch  # plots' x axis is the 1-based epoch, as in the seeds' logs
            live.log_metric("train/loss", result["loss"])
            live.log_metric("train/accuracy", result["accuracy"])
            live.log_metric("test/loss", test["loss"])
            live.log_metric("test/accuracy", test["accuracy"])
            live.log_metric("lr", result["lrs"][-1])
            live.next_step()
            print(f"epoch {epoch:3d}  lr {result['lrs'][-1]:.3e}  train loss {result['loss']:.4f} "
                  f"acc {result['accuracy']:.4f}  test loss {test['loss']:.4f} acc {test['accuracy']:.4f}  "
                  f"{seconds:.1f}s {result['images'] / seconds:.0f} img/s")
        live.summary["max_lr"] = max_lr
        live.summary["epochs"] = train.epochs

    with atomic_path(paths.LR_SCHEDULE) as tmp:
        tmp.write_text("step,lr\n" + "".join(f"{i},{lr!r}\n" for i, lr in enumerate(all_lrs)))
    write_json(paths.TRAIN_SPEED, {
        "images_per_second": sum(images_per_second) / len(images_per_second),
        "epoch_seconds_mean": sum(epoch_seconds) / len(epoch_seconds),
        "epoch_seconds": epoch_seconds, **runtime.describe()})
    save_checkpoint(paths.CHECKPOINT, model, epoch=train.epochs, max_lr=max_lr, dropout=params.model.dropout,
                    num_classes=len(dataset.classes), classes=list(dataset.classes),
                    data_source=dataset.source, params=params.to_dict())
    return {"max_lr": max_lr}
