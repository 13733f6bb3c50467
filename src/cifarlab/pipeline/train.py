"""The train stage's work: resolve the max LR, build everything from params, run the epochs, log.

The test split is measured after every epoch for the curves only; nothing is selected or stopped
on it, and the saved model is the last epoch's.

After every epoch the full training state is saved to `.cache/train/<fingerprint>.pt` (copied at
once, written by a background thread while the next epoch trains: `checkpoint.StateWriter`) and
deleted when the run completes; `cifarlab.engine.resume` says what it holds and which run it
belongs to. So a rerun after an interruption resumes from the last complete epoch, a rerun after
a completed run (`dvc repro -f` included) starts over, and DVC can restore train from its run-cache.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from dvclive import Live
from tqdm import tqdm

from cifarlab import paths
from cifarlab.atomic import atomic_path, write_json
from cifarlab.config.params import Params
from cifarlab.data.augment import build_train_transform
from cifarlab.data.loaders import ResidentBatches, augment_path, train_loader
from cifarlab.data.storage import Dataset
from cifarlab.data.subset import load_subset
from cifarlab.engine.checkpoint import StateWriter, save_checkpoint
from cifarlab.engine.classifier import build_model
from cifarlab.engine.distributed import (Distributed, check_batch_size, gather_objects, init_distributed, launch,
                                         launched, shutdown)
from cifarlab.engine.lookahead import Lookahead
from cifarlab.engine.loops import DivergenceGuard, TrainingDiverged, evaluate, train_one_epoch
from cifarlab.engine.resume import (ResumeState, Trainables, TrainingRecord, load_resume_state, process_state,
                                    remove_resume_state, run_fingerprint, save_resume_state, state_path)
from cifarlab.engine.runtime import Runtime, seed_everything, select_runtime
from cifarlab.engine.schedule import build_optimizer, build_scheduler, onecycle_for
from cifarlab.engine.slots import claim_for
from cifarlab.engine.timer import EpochTimer, phase_summary
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


def train_stage(params: Params, script: str) -> None:
    """The train stage: one training process, or with `runtime.nproc` N > 1 (and not yet launched)
    N processes of `script` as one DDP run, which this process starts and waits for, with
    `runtime.nnodes` > 1 this machine's share of a run over several (see cifarlab.engine.distributed);
    a process started that way, or by torchrun, trains its share. The stage holds its share of the
    machine (`cifarlab.engine.slots`: its GPUs, or its cores) until it ends."""
    rt = params.runtime
    runtime = select_runtime(rt, claim_for(rt, "train", rt.nproc), rt.nproc)
    subsets = params.data.train_subset, params.data.test_subset   # the images train sees (0 = a whole split)
    try:
        if (rt.nproc > 1 or rt.nnodes > 1) and not launched():
            check_batch_size(params.train.batch_size, Distributed(world_size=rt.nproc * rt.nnodes), rt.nnodes)
            load_subset(paths.DATA_DIR, *subsets)     # a bad data file or subset size is reported once, here
            launch(rt.nproc, script, runtime.slot, rt.nnodes, rt.rdzv_endpoint)
            return
        world = init_distributed(runtime.device.type)
        try:
            fit(params, load_subset(paths.DATA_DIR, *subsets), runtime, world)
        finally:
            shutdown()
    finally:
        if runtime.slot is not None:
            runtime.slot.release()


@dataclass(frozen=True)
class Run:
    """What `fit` builds from params before its first epoch."""

    params: Params
    dataset: Dataset
    runtime: Runtime
    world: Distributed
    chosen: dict                 # the max_lr stage's record
    augmentation: str            # where augmentation runs ("batch": on the device) and why
    augmentation_reason: str
    loader: Any
    trained: torch.nn.Module     # what the steps run: the model, or its DDP or compiled wrapper
    trainables: Trainables       # the plain model (evaluation, state and checkpoint use it), optimizer, ...
    guard: DivergenceGuard
    fingerprint: str
    writer: StateWriter          # the per-epoch state, written while the next epoch trains

    @property
    def max_lr(self) -> float:
        return float(self.chosen["max_lr"])

    @property
    def state_file(self) -> Path:
        return state_path(self.fingerprint)


def build_run(params: Params, dataset: Dataset, runtime: Runtime, world: Distributed) -> Run:
    """Everything the epochs need, built in this order after seeding: the model's initial weights are drawn here."""
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
    return Run(params, dataset, runtime, world, chosen, augmentation, augmentation_reason, loader, trained,
               Trainables(net, optimizer, scheduler, scaler, lookahead), guard,
               run_fingerprint(params, runtime, max_lr, world_size=world.world_size), StateWriter())


def fit(params: Params, dataset: Dataset, runtime: Runtime, world: Distributed = Distributed()) -> dict:
    """Train for `train.epochs` epochs and write the checkpoint, dvclive metrics, speed and LR log.

    In a distributed run every process calls this; only rank 0 evaluates, logs and writes files.
    """
    run = build_run(params, dataset, runtime, world)
    state = load_resume_state(run.fingerprint, verbose=world.is_main)
    record = state.restore(run.trainables, run.guard, world.rank) if state is not None else TrainingRecord()
    first_epoch = state.epoch + 1 if state is not None else 1
    if world.is_main:
        _announce(run)
    logger = (Live(str(paths.TRAIN_LIVE_DIR), dvcyaml=False, save_dvc_exp=False) if world.is_main
              else contextlib.nullcontext())
    with logger as live:
        for epoch in range(1, first_epoch if world.is_main else 1):   # a resumed run re-logs its epochs (rank 0 logs)
            _log(live, epoch, {name: values[epoch - 1] for name, values in record.history.items()})
        _train_epochs(run, record, first_epoch, live)
        run.writer.wait()       # the last epoch's state is written before the run's end deletes it
        if not world.is_main:
            return {"max_lr": run.max_lr}
        live.summary["max_lr"] = run.max_lr
        live.summary["epochs"] = params.train.epochs
    _write_outputs(run, record)
    remove_resume_state(run.state_file)
    return {"max_lr": run.max_lr}


def _announce(run: Run) -> None:
    """Rank 0's line on what is trained how, and the augmentation preview."""
    # Imported here: matplotlib is loaded by the process that draws (rank 0), when it draws.
    from cifarlab.pipeline.plots import write_preview

    params, train, dataset, runtime, world = run.params, run.params.train, run.dataset, run.runtime, run.world
    print(f"train: {params.model.name} on {len(dataset.train)} {dataset.source} images, "
          f"{train.epochs} epochs x {len(run.loader)} steps, max_lr {run.max_lr:.3g} "
          f"({'lr_find' if train.max_lr == 'find' else 'params'}), {runtime.device} {runtime.precision}, "
          f"augmentation on the {'device, whole batches' if run.augmentation == 'batch' else 'CPU, per image'} "
          f"({run.augmentation_reason})"
          + (f", {world.world_size} processes" if world.enabled else "")
          + (f", whitening bias trained for {params.optim.whiten_bias_epochs} epochs (optim.whiten_bias_epochs)"
             if params.optim.whiten_bias_epochs is not None else ""))
    write_preview(params.augment, build_train_transform, dataset.train.images, dataset.train.labels,
                  dataset.classes, train.seed)


def _train_epochs(run: Run, record: TrainingRecord, first_epoch: int, live: Optional[Live]) -> None:
    """Epochs `first_epoch` to `train.epochs`; a divergence, an interruption or a failed torch.compile
    ends them with one line saying which epoch and what is kept."""
    epoch, batches = first_epoch, None
    # The test split, held on the device once: each epoch's test pass copies nothing.
    test_batches = (ResidentBatches(run.dataset.test, run.params.evaluate.batch_size, run.runtime.device)
                    if run.world.is_main else None)
    try:
        for epoch in range(first_epoch, run.params.train.epochs + 1):
            batches = _epoch(run, record, epoch, batches, test_batches, live)
    except TrainingDiverged as err:
        run.writer.wait()   # the state reported as kept is on disk
        kept = (f"the last good state (epoch {epoch - 1}) is kept in {run.state_file}" if epoch > 1
                else "no epoch completed")
        raise TrainingDiverged(f"{err}; {kept}") from None
    except KeyboardInterrupt:
        run.writer.wait()   # the state reported as saved is on disk
        how = "" if (stop_signal() or 2) == 2 else f" ({signal_name(stop_signal())})"
        kept = (f"the state after epoch {epoch - 1} is saved in {run.state_file}, rerun to resume" if epoch > 1
                else "no epoch completed, a rerun starts fresh")
        raise Interrupted(f"interrupted{how} during epoch {epoch}; {kept}") from None
    except torch._dynamo.exc.TorchDynamoException as err:
        # Only runtime.compile gets here (e.g. no C++ compiler for inductor on this machine).
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CifarlabError(f"runtime.compile is true but torch.compile failed in epoch {epoch}: {first}; "
                            f"set runtime.compile: false") from None


def _epoch(run: Run, record: TrainingRecord, epoch: int, batches: Optional[Iterator],
           test_batches: Optional[ResidentBatches], live: Optional[Live]) -> Optional[Iterator]:
    """One epoch in every process: train, then (rank 0) measure the test split, log and save the state.
    `batches` is this epoch's, already started (None: start them); returns the next epoch's."""
    params, train = run.params, run.params.train
    timer = EpochTimer(epoch)
    if params.optim.whiten_bias_epochs is not None:   # airbench94 trains it for its first 3 epochs
        run.trainables.model.train_whitening_bias(epoch <= params.optim.whiten_bias_epochs)
    if batches is None:
        batches = iter(run.loader.epoch(epoch))   # the first epoch of this process: starts the workers
    lookahead = run.trainables.lookahead
    with tqdm(total=len(run.loader), desc=f"epoch {epoch}/{train.epochs}", leave=False,
              disable=not run.world.is_main) as bar:
        result = train_one_epoch(run.trained, batches, run.trainables.optimizer, run.trainables.scheduler,
                                 run.runtime, params.optim.label_smoothing, run.trainables.scaler, bar, run.guard,
                                 record.lrs, after_step=lookahead.after_step if lookahead is not None else None)
        if lookahead is not None and epoch == train.epochs:
            lookahead.finish()             # the model keeps the averaged weights
    seconds = timer.trained(result)
    record.epoch_seconds.append(seconds)
    record.images_per_second.append(result["images"] / seconds)
    processes = gather_objects(process_state(run.guard))   # a collective
    # The same workers start on the next epoch's batches now, while this process measures
    # the test split and saves the state: the next epoch's first batches are then ready.
    following = iter(run.loader.epoch(epoch + 1)) if epoch < train.epochs else None
    if run.world.is_main:
        _measure_log_save(run, record, timer, result, processes, test_batches, live)
    return following


def _measure_log_save(run: Run, record: TrainingRecord, timer: EpochTimer, result: dict, processes: list[dict],
                      test_batches: ResidentBatches, live: Live) -> None:
    """Rank 0's end of an epoch: the test pass, the logs and the saved state, each timed."""
    epoch, seconds = timer.phase["epoch"], record.epoch_seconds[-1]
    with timer.timing("test_pass"):
        test = evaluate(run.trainables.model, test_batches, run.runtime)
    row = {"train/loss": result["loss"], "train/accuracy": result["accuracy"],
           "test/loss": test["loss"], "test/accuracy": test["accuracy"], "lr": result["last_lr"]}
    for name in paths.TRAIN_LOGGED:
        record.history[name].append(row[name])
    _log(live, epoch, row)
    record.phases.append(timer.phase)   # saved with the state; its save time and total are filled in below
    # `state_save` is what the loop waits for (copying the state); the file itself is written in
    # the background (train_speed.json's state_write_seconds).
    with timer.timing("state_save"):
        save_resume_state(run.writer, run.state_file,
                          ResumeState(run.fingerprint, epoch, run.trainables.state_dict(), processes, record))
    print(f"epoch {epoch:3d}  lr {row['lr']:.3e}  train loss {row['train/loss']:.4f} "
          f"acc {row['train/accuracy']:.4f}  test loss {row['test/loss']:.4f} "
          f"acc {row['test/accuracy']:.4f}  {seconds:.1f}s {result['images'] / seconds:.0f} img/s")
    timer.close()


def _write_outputs(run: Run, record: TrainingRecord) -> None:
    """The completed run's files: LR log, time to accuracy, speed, summary metrics and the checkpoint."""
    train, dataset, max_lr = run.params.train, run.dataset, run.max_lr
    with atomic_path(paths.LR_SCHEDULE) as tmp:
        tmp.write_text("step,lr\n" + "".join(f"{i},{lr!r}\n" for i, lr in enumerate(record.lrs)))
    with atomic_path(paths.TIME_TO_ACCURACY) as tmp:   # test accuracy against cumulative training seconds
        tmp.write_text("epoch,seconds,accuracy\n" + "".join(
            f"{epoch},{seconds!r},{accuracy!r}\n" for epoch, seconds, accuracy in
            zip(range(1, train.epochs + 1), itertools.accumulate(record.epoch_seconds),
                record.history["test/accuracy"])))
    images_per_second = sum(record.images_per_second) / len(record.images_per_second)
    write_json(paths.TRAIN_SPEED, {
        "images_per_second": images_per_second,
        "epoch_seconds_mean": sum(record.epoch_seconds) / len(record.epoch_seconds),
        "epoch_seconds": record.epoch_seconds, "processes": run.world.world_size, **run.runtime.describe(),
        "slot": run.runtime.placement(),
        **phase_summary(record.phases), "state_write_seconds": run.writer.seconds})
    write_json(paths.TRAIN_SUMMARY, {   # what `dvc exp show` compares; the learning curves are in TRAIN_LIVE_DIR
        "max_lr": max_lr, "epochs": train.epochs, "images_per_second": images_per_second,
        "train_minutes": sum(record.epoch_seconds) / 60})
    save_checkpoint(paths.CHECKPOINT, run.trainables.model, epoch=train.epochs, max_lr=max_lr,
                    dropout=run.params.model.dropout, num_classes=len(dataset.classes),
                    classes=list(dataset.classes), data_source=dataset.source, params=run.params.to_dict())


def _log(live: Live, epoch: int, row: dict[str, float]) -> None:
    live.step = epoch  # plots' x axis is the 1-based epoch, as in the seeds' logs
    for name in paths.TRAIN_LOGGED:
        live.log_metric(name, row[name])
    live.next_step()
