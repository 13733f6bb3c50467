"""The train stage's work: resolve the max LR, build everything from params, run the epochs, log.

The test split is measured after every epoch for the curves only; nothing is selected or stopped
on it, and the saved model is the last epoch's.

After every epoch the full training state (model, optimizer, scheduler, scaler, every process's RNG
states and guard, logged history) is saved to `.cache/train/<fingerprint>.pt` (copied at once, written
by a background thread while the next epoch trains: `checkpoint.StateWriter`): outside DVC's outs
(dvcignored and git-ignored), keyed by the run fingerprint (the params train reads, the resolved max
LR and runtime, and every file dvc.yaml lists as a train dep: data and code), and deleted when the
run completes. So a rerun after an interruption resumes from the last complete epoch, a rerun after
a completed run (`dvc repro -f` included) starts over, and DVC can restore train from its run-cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Optional, Union

import torch
from dvclive import Live
from tqdm import tqdm

from cifarlab import dvcfile, paths
from cifarlab.atomic import atomic_path, write_json
from cifarlab.data.augment import write_preview
from cifarlab.engine.checkpoint import StateWriter, save_checkpoint
from cifarlab.engine.distributed import (Distributed, check_batch_size, gather_objects, init_distributed, launch, launched,
                                  shutdown)
from cifarlab.config.params import Params, ParamsError, read_yaml
from cifarlab.data.loaders import ResidentBatches, augment_path, train_loader
from cifarlab.data.storage import Dataset
from cifarlab.data.subset import load_subset
from cifarlab.engine.classifier import build_model
from cifarlab.engine.lookahead import Lookahead
from cifarlab.engine.loops import DivergenceGuard, TrainingDiverged, evaluate, train_one_epoch
from cifarlab.engine.runtime import Runtime, rng_state, seed_everything, select_runtime, set_rng_state
from cifarlab.engine.schedule import build_optimizer, build_scheduler, onecycle_for
from cifarlab.errors import CifarlabError
from cifarlab.lifetime import signal_name, stop_signal
from cifarlab.pipeline.max_lr import read as read_max_lr



class Interrupted(CifarlabError):
    """Ctrl-C during training; the last complete epoch's state is on disk."""

    def __init__(self, message: str):
        super().__init__(message)
        self.exit_code = 128 + (stop_signal() or 2)   # 130 for Ctrl-C (SIGINT), 143 for SIGTERM


def resolve_max_lr(max_lr: Union[float, str], resolved: Path = paths.MAX_LR) -> float:
    """`train.max_lr` as a number: itself, or lr_find's suggestion when it is `find` (via the max_lr stage)."""
    return float(read_max_lr(max_lr, resolved)["max_lr"])


def divergence_advice(chosen: dict) -> str:
    """What to change when training diverges, which depends on where its max LR came from
    (`chosen`: the max_lr stage's record, `cifarlab.pipeline.max_lr.read`)."""
    used = float(chosen["max_lr"])
    lower = f"{used / 3:.2g}"
    if chosen["chosen_by"] != "lr_find":
        return f"lower train.max_lr (e.g. {lower}), or set it to `find` to take the LR range test's suggestion"
    return (f"the max LR {used:.3g} came from lr_find's `{chosen['rule']}` rule (loss minimum at "
            f"{float(chosen['loss_minimum_lr']):.3g}): set train.max_lr to a number below it, e.g. {lower}")


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


def load_resume_state(fingerprint: str, state_dir: Path = paths.TRAIN_STATE_DIR, verbose: bool = True
                      ) -> Optional[dict]:
    """This run's saved state, or None (with a line saying why) when there is none to resume."""
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
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["fingerprint"]
    except Exception as err:  # a truncated or foreign file is not fatal: it is simply not resumable
        say(f"train: saved state {path} is unreadable ({str(err).splitlines()[0][:120]}), starting fresh")
        return None
    if saved != fingerprint:
        say(f"train: saved state {path} is from a different run (params, data or code changed), starting fresh")
        return None
    say(f"train: resuming from the end of epoch {state['epoch']} ({path})")
    return state


def train_stage(params: Params, script: str) -> None:
    """The train stage: one training process, or with `runtime.nproc` N > 1 (and not yet launched)
    N processes of `script` as one DDP run, which this process starts and waits for
    (see cifarlab.engine.distributed); a process started that way, or by torchrun, trains its share."""
    runtime = select_runtime(params.runtime)
    subsets = params.data.train_subset, params.data.test_subset   # the images train sees (0 = a whole split)
    if params.runtime.nproc > 1 and not launched():
        check_batch_size(params.train.batch_size, Distributed(world_size=params.runtime.nproc))
        load_subset(paths.DATA_DIR, *subsets)     # a bad data file or subset size is reported once, here
        launch(params.runtime.nproc, script)
        return
    world = init_distributed(runtime.device.type)
    try:
        fit(params, load_subset(paths.DATA_DIR, *subsets), runtime, world)
    finally:
        shutdown()


def fit(params: Params, dataset: Dataset, runtime: Runtime, world: Distributed = Distributed()) -> dict:
    """Train for `train.epochs` epochs and write the checkpoint, dvclive metrics, speed and LR log.

    In a distributed run every process calls this; only rank 0 evaluates, logs and writes files.
    """
    train = params.train
    chosen = read_max_lr(train.max_lr)      # the max_lr stage's file, read once
    max_lr = float(chosen["max_lr"])
    check_batch_size(train.batch_size, world)
    seed_everything(train.seed + world.rank, params.runtime.deterministic)
    augmentation, augmentation_reason = augment_path(params.augment, runtime)
    loader = train_loader(dataset.train, params.augment, train.batch_size, train.seed,
                          runtime, world.rank, world.world_size, path=augmentation, drop_last=train.drop_last)
    net = build_model(params.model, runtime, len(dataset.classes), dataset.train.images)
    model = net
    if world.enabled:
        # A whitening bias that stops training stops getting gradients: DDP must look for unused parameters.
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[world.local_rank] if runtime.device.type == "cuda" else None,
            find_unused_parameters=params.optim.whiten_bias_epochs is not None)
    cycle = onecycle_for(train, len(loader), max_lr)
    optimizer = build_optimizer(model, params.optim, lr=cycle.start_lr)
    # The compiled module shares `net`'s parameters: evaluation, state and checkpoint use `net` itself.
    trained = torch.compile(model) if runtime.compile else model
    scheduler = build_scheduler(optimizer, cycle, train.cycle_momentum)
    scaler = torch.amp.GradScaler("cuda") if runtime.needs_grad_scaler() else None
    guard = DivergenceGuard(train.diverge_factor, runtime.device, divergence_advice(chosen))
    lookahead = Lookahead(net, cycle.total_steps) if params.optim.lookahead else None
    history: dict[str, list[float]] = {name: [] for name in paths.TRAIN_LOGGED}
    lrs: list[float] = []
    epoch_seconds: list[float] = []
    images_per_second: list[float] = []
    phases: list[dict] = []      # where each epoch's wall time went (train_speed.json's epoch_phases)
    writer = StateWriter()       # the per-epoch state, written while the next epoch trains

    fingerprint = run_fingerprint(params, runtime, max_lr, world_size=world.world_size)
    state_file = state_path(fingerprint)
    state = load_resume_state(fingerprint, verbose=world.is_main)
    first_epoch = 1
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        guard.load_state_dict(state["guard"][world.rank])   # each process's own guard and RNG states
        set_rng_state(state["rng"][world.rank])
        if lookahead is not None:
            lookahead.load_state_dict(state["lookahead"])
        history, lrs = state["history"], state["lrs"]
        epoch_seconds, images_per_second = state["epoch_seconds"], state["images_per_second"]
        phases = state["phases"]
        first_epoch = state["epoch"] + 1

    if world.is_main:
        print(f"train: {params.model.name} on {len(dataset.train)} {dataset.source} images, "
              f"{train.epochs} epochs x {len(loader)} steps, max_lr {max_lr:.3g} "
              f"({'lr_find' if train.max_lr == 'find' else 'params'}), {runtime.device} {runtime.precision}, "
              f"augmentation on the {'device, whole batches' if augmentation == 'batch' else 'CPU, per image'} "
              f"({augmentation_reason})"
              + (f", {world.world_size} processes" if world.enabled else "")
              + (f", whitening bias trained for {params.optim.whiten_bias_epochs} epochs (optim.whiten_bias_epochs)"
                 if params.optim.whiten_bias_epochs is not None else ""))
        write_preview(params.augment, dataset.train.images, dataset.train.labels, dataset.classes, train.seed)
    logger = (Live(str(paths.TRAIN_LIVE_DIR), dvcyaml=False, save_dvc_exp=False) if world.is_main
              else contextlib.nullcontext())
    with logger as live:
        for epoch in range(1, first_epoch if world.is_main else 1):   # a resumed run re-logs its epochs (rank 0 logs)
            _log(live, epoch, {name: values[epoch - 1] for name, values in history.items()})
        epoch = first_epoch
        # The test split, held on the device once: each epoch's test pass copies nothing.
        test_batches = (ResidentBatches(dataset.test, params.evaluate.batch_size, runtime.device)
                        if world.is_main else None)
        batches = None
        try:
            for epoch in range(first_epoch, train.epochs + 1):
                started = time.perf_counter()
                if params.optim.whiten_bias_epochs is not None:   # airbench94 trains it for its first 3 epochs
                    net.train_whitening_bias(epoch <= params.optim.whiten_bias_epochs)
                if batches is None:
                    batches = iter(loader.epoch(epoch))   # the first epoch of this process: starts the workers
                with tqdm(total=len(loader), desc=f"epoch {epoch}/{train.epochs}", leave=False,
                          disable=not world.is_main) as bar:
                    result = train_one_epoch(trained, batches, optimizer, scheduler, runtime,
                                             params.optim.label_smoothing, scaler, bar, guard, lrs,
                                             after_step=lookahead.after_step if lookahead is not None else None)
                    if lookahead is not None and epoch == train.epochs:
                        lookahead.finish()             # the model keeps the averaged weights
                seconds = time.perf_counter() - started
                epoch_seconds.append(seconds)
                images_per_second.append(result["images"] / seconds)
                per_process = gather_objects({"rng": rng_state(), "guard": guard.state_dict()})   # a collective
                # The same workers start on the next epoch's batches now, while this process measures
                # the test split and saves the state: the next epoch's first batches are then ready.
                batches = iter(loader.epoch(epoch + 1)) if epoch < train.epochs else None
                if not world.is_main:
                    continue
                timer = time.perf_counter()
                test = evaluate(net, test_batches, runtime)
                phase = _phase_times(epoch, result, seconds, test_pass=time.perf_counter() - timer)
                row = {"train/loss": result["loss"], "train/accuracy": result["accuracy"],
                       "test/loss": test["loss"], "test/accuracy": test["accuracy"], "lr": result["last_lr"]}
                for name in paths.TRAIN_LOGGED:
                    history[name].append(row[name])
                _log(live, epoch, row)
                phases.append(phase)   # saved with the state; its save time and total are filled in below
                # `state_save` is what the loop waits for (copying the state); the file itself is written in
                # the background (train_speed.json's state_write_seconds).
                timer = time.perf_counter()
                _save_state(writer, state_file, fingerprint, epoch, net, optimizer, scheduler, scaler, per_process,
                            history, lrs, epoch_seconds, images_per_second, phases, lookahead)
                phase["state_save"] = time.perf_counter() - timer
                print(f"epoch {epoch:3d}  lr {row['lr']:.3e}  train loss {row['train/loss']:.4f} "
                      f"acc {row['train/accuracy']:.4f}  test loss {row['test/loss']:.4f} "
                      f"acc {row['test/accuracy']:.4f}  {seconds:.1f}s {result['images'] / seconds:.0f} img/s")
                _close_phase(phase, started)
        except TrainingDiverged as err:
            writer.wait()   # the state reported as kept is on disk
            kept = (f"the last good state (epoch {epoch - 1}) is kept in {state_file}" if epoch > 1
                    else "no epoch completed")
            raise TrainingDiverged(f"{err}; {kept}") from None
        except KeyboardInterrupt:
            writer.wait()   # the state reported as saved is on disk
            how = "" if (stop_signal() or 2) == 2 else f" ({signal_name(stop_signal())})"
            kept = (f"the state after epoch {epoch - 1} is saved in {state_file}, rerun to resume" if epoch > 1
                    else "no epoch completed, a rerun starts fresh")
            raise Interrupted(f"interrupted{how} during epoch {epoch}; {kept}") from None
        except torch._dynamo.exc.TorchDynamoException as err:
            # Only runtime.compile gets here (e.g. no C++ compiler for inductor on this machine).
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise CifarlabError(f"runtime.compile is true but torch.compile failed in epoch {epoch}: {first}; "
                                f"set runtime.compile: false") from None
        writer.wait()       # the last epoch's state is written before the run's end deletes it
        if not world.is_main:
            return {"max_lr": max_lr}
        live.summary["max_lr"] = max_lr
        live.summary["epochs"] = train.epochs

    with atomic_path(paths.LR_SCHEDULE) as tmp:
        tmp.write_text("step,lr\n" + "".join(f"{i},{lr!r}\n" for i, lr in enumerate(lrs)))
    with atomic_path(paths.TIME_TO_ACCURACY) as tmp:   # test accuracy against cumulative training seconds
        tmp.write_text("epoch,seconds,accuracy\n" + "".join(
            f"{epoch},{seconds!r},{accuracy!r}\n" for epoch, seconds, accuracy in
            zip(range(1, train.epochs + 1), itertools.accumulate(epoch_seconds), history["test/accuracy"])))
    write_json(paths.TRAIN_SPEED, {
        "images_per_second": sum(images_per_second) / len(images_per_second),
        "epoch_seconds_mean": sum(epoch_seconds) / len(epoch_seconds),
        "epoch_seconds": epoch_seconds, "processes": world.world_size, **runtime.describe(),
        **_phase_summary(phases), "state_write_seconds": writer.seconds})
    write_json(paths.TRAIN_SUMMARY, {   # what `dvc exp show` compares; the learning curves are in TRAIN_LIVE_DIR
        "max_lr": max_lr, "epochs": train.epochs,
        "images_per_second": sum(images_per_second) / len(images_per_second),
        "train_minutes": sum(epoch_seconds) / 60})
    save_checkpoint(paths.CHECKPOINT, net, epoch=train.epochs, max_lr=max_lr, dropout=params.model.dropout,
                    num_classes=len(dataset.classes), classes=list(dataset.classes),
                    data_source=dataset.source, params=params.to_dict())
    state_file.unlink(missing_ok=True)      # the run is complete: a rerun (`dvc repro -f`) starts over
    with contextlib.suppress(OSError):
        os.rmdir(state_file.parent)         # only if no other run's state is left there
    return {"max_lr": max_lr}


def _log(live: Live, epoch: int, row: dict[str, float]) -> None:
    live.step = epoch  # plots' x axis is the 1-based epoch, as in the seeds' logs
    for name in paths.TRAIN_LOGGED:
        live.log_metric(name, row[name])
    live.next_step()


PHASES = ("seconds", "steps", "data_wait", "first_batch", "test_pass", "state_save", "other", "overhead")


def _phase_times(epoch: int, result: dict, train_seconds: float, test_pass: float) -> dict:
    """The epoch's wall time so far, by phase: `steps` is the training pass less its waits for batches
    (`data_wait`, of which `first_batch` is the loader's start); the rest is filled in by `_close_phase`."""
    return {"epoch": epoch, "seconds": None, "steps": train_seconds - result["data_wait_seconds"],
            "data_wait": result["data_wait_seconds"], "first_batch": result["first_batch_seconds"],
            "test_pass": test_pass, "state_save": None, "other": None, "overhead": None}


def _close_phase(phase: dict, started: float) -> None:
    """Complete an epoch's record: `seconds` is its whole wall time (training to the log line),
    `overhead` everything but the training steps and the test pass, `other` what no phase names
    (progress bar, gathering RNG states, dvclive logging, the log line)."""
    phase["seconds"] = time.perf_counter() - started
    phase["overhead"] = phase["seconds"] - phase["steps"] - phase["test_pass"]
    phase["other"] = phase["overhead"] - phase["data_wait"] - phase["state_save"]


def _phase_summary(phases: list[dict]) -> dict:
    """train_speed.json's per-epoch phase times and their means over the epochs measured whole (an
    epoch saved just before an interruption has no save time or total: null)."""
    complete = [p for p in phases if p.get("seconds") is not None]
    means = {f"{name}_seconds_mean": sum(p[name] for p in complete) / len(complete)
             for name in PHASES if complete}
    return {"epoch_phases": phases, "epoch_phase_means": means}


def _save_state(writer: StateWriter, path: Path, fingerprint: str, epoch: int, model, optimizer, scheduler, scaler,
                per_process, history, lrs, epoch_seconds, images_per_second, phases,
                lookahead: Optional[Lookahead]) -> None:
    state = {"fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "guard": [p["guard"] for p in per_process], "rng": [p["rng"] for p in per_process],
             "history": history, "lrs": lrs, "epoch_seconds": epoch_seconds,
             "images_per_second": images_per_second, "phases": phases,
             "lookahead": lookahead.state_dict() if lookahead is not None else None}
    writer.save(path, state)   # waits only for the copy; the file is written while training goes on
