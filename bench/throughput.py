"""Training, data-loading and evaluation throughput of the pipeline, against a seed-style loop.

One run on one machine measures, for the model and batch size in params.yaml (custom_resnet, 512):

  pipeline   the train stage's own path: `select_runtime`, `build_model`, `train_loader` with
             `build_train_transform`, `train_one_epoch` with the real OneCycle of `cifarlab.engine.schedule`
  reference  the loop the seed notebooks wrote: a torch Dataset applying an albumentations Compose
             (Normalize, pad + random crop, flip, cutout, ToTensorV2) per image, DataLoader with
             num_workers=0, fp32, NCHW, Adam, OneCycleLR stepped per batch, `loss.item()` and a
             tqdm description every batch; the same network class (bench/reference_loop.py)
  step alone the pipeline path's step with its batches already on the device (no loader)
  loader     the pipeline's training loader alone (no model)
  eval       `loops.evaluate` over the test split
  compile    (--compile) the pipeline path with the model wrapped in torch.compile
  epoch loop (--loop-epochs N, default 3) `fit` (cifarlab.pipeline.train) itself for N epochs in a scratch directory:
             where each epoch's time goes (steps, loader start, test pass, state save, logging) and
             the fixed per-epoch overhead (everything but the steps and the test pass)

Every path is warmed up for --warmup batches, then timed over --batches batches. Results go to
stdout as `key: value` lines (documented in bench/README.md); progress bars and notes go to
stderr; --json writes the same numbers. Nothing is written to the repository.

    python bench/throughput.py --batches 6
    python bench/throughput.py --data data --batches 20 --json /tmp/bench.json
    python bench/throughput.py --set runtime.precision=fp32 --set runtime.channels_last=false
    python bench/throughput.py --skip-reference --batches 2 --warmup 1 --loop-epochs 3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(REPO / "src")]:
    sys.path.insert(0, str(REPO / "src"))   # this checkout's library, as stages/_src.py does for the stages

import cv2  # noqa: E402  (after the path above)
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cifarlab import paths  # noqa: E402
from cifarlab.config.params import FIND, Params, apply_overrides, parse_params, read_yaml  # noqa: E402
from cifarlab.data.loaders import augment_path, iterate_batches, train_loader  # noqa: E402
from cifarlab.data.sources import make_synthetic  # noqa: E402
from cifarlab.data.storage import Dataset, load_dataset, Split  # noqa: E402
from cifarlab.engine.classifier import build_model  # noqa: E402
from cifarlab.engine.loops import DivergenceGuard, evaluate, train_one_epoch  # noqa: E402
from cifarlab.engine.runtime import cpu_supports_bf16, Runtime, seed_everything, select_runtime, to_device  # noqa: E402
from cifarlab.engine.schedule import build_optimizer, build_scheduler, onecycle_for  # noqa: E402
from cifarlab.errors import CifarlabError  # noqa: E402
from cifarlab.pipeline.train import fit, resolve_max_lr  # noqa: E402
from machine import describe_cpu  # noqa: E402  (bench/machine.py: this script's folder is on sys.path)
from reference_loop import SeedStyleLoop  # noqa: E402  (bench/reference_loop.py: the seeds' loop)

# The OneCycle peak when train.max_lr is `find` and this checkout has no usable lr_find output: the
# timings do not depend on it, so the benchmark runs on without `dvc repro lr_find` and says so.
FALLBACK_MAX_LR = 1.7e-3


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- params and data ----------------------------------------------------------------------------

def load_bench_params(path: Path, overrides: list[str], batch_size: int) -> Params:
    """params.yaml read as the stages read it (`read_yaml`, `parse_params`), with the `--set
    section.key=value` overrides (`apply_overrides`) and the benchmark's batch size."""
    raw = apply_overrides(read_yaml(path), overrides)
    raw["train"]["batch_size"] = batch_size
    # The benchmark sizes its own synthetic set; keep the cross-section size check satisfied.
    raw["data"]["synthetic_train_size"] = max(raw["data"]["synthetic_train_size"], batch_size)
    return parse_params(raw)


@contextlib.contextmanager
def working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def bench_max_lr(params: Params) -> tuple[float, str]:
    """The OneCycle peak the train stage would use, resolved by the train stage's own `resolve_max_lr`
    from the repository root, and where it came from; when train.max_lr is `find` and there is no
    usable lr_find output, FALLBACK_MAX_LR, labelled as such."""
    if params.train.max_lr != FIND:
        return resolve_max_lr(params.train.max_lr), "params (train.max_lr)"
    try:
        with working_directory(REPO):
            return resolve_max_lr(params.train.max_lr), "lr_find (train.max_lr: find)"
    except CifarlabError:
        return FALLBACK_MAX_LR, f"fallback {FALLBACK_MAX_LR:g} (train.max_lr is find but there is no lr_find output)"


def bench_dataset(data: str, params: Params, train_images: int, eval_images: int) -> Dataset:
    """The synthetic set sized for the run, or the real data dir (test split cut to eval_images)."""
    if data == "synthetic":
        return make_synthetic(train_images, eval_images, params.data.synthetic_seed)
    dataset = load_dataset(data)
    if len(dataset.train) < train_images:
        raise SystemExit(f"{data} has {len(dataset.train)} training images; this run needs {train_images}")
    test = dataset.test
    if 0 < eval_images < len(test):
        test = Split(test.images[:eval_images], test.labels[:eval_images])
    return replace(dataset, test=test)


# --- timing helpers -----------------------------------------------------------------------------

class TimedBatches:
    """The next `count` batches of `iterator`, recording the seconds spent waiting for each."""

    def __init__(self, iterator: Iterator, count: int):
        self.iterator, self.count = iterator, count
        self.wait_seconds = 0.0

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for _ in range(self.count):
            started = time.perf_counter()
            batch = next(self.iterator)
            self.wait_seconds += time.perf_counter() - started
            yield batch


def cpu_seconds() -> float:
    """This process's user + system CPU time (all its threads; not DataLoader workers)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0   # ru_maxrss is KiB on Linux


class PathTimer:
    """Accumulates one training path's timed chunks: wall and CPU seconds, data wait, images."""

    def __init__(self):
        self.seconds = self.cpu = self.data_wait = 0.0
        self.images = self.batches = 0
        self.warmup_seconds = 0.0

    def measure(self, chunk, batches: "TimedBatches"):
        cpu_started, started = cpu_seconds(), time.perf_counter()
        images = chunk()
        self.seconds += time.perf_counter() - started
        self.cpu += cpu_seconds() - cpu_started
        self.data_wait += batches.wait_seconds
        self.images += images
        self.batches += len(batches)

    def results(self) -> dict:
        return {"images_per_s": self.images / self.seconds, "step_ms": 1000 * self.seconds / self.batches,
                "cores_used": self.cpu / self.seconds, "data_wait_share": self.data_wait / self.seconds,
                "data_wait_ms_per_batch": 1000 * self.data_wait / self.batches,
                "warmup_seconds": self.warmup_seconds}


# --- (a) the pipeline's train path --------------------------------------------------------------

class TimedPath:
    """A training path: `_train` runs the given batches; warmup is untimed, `run` is measured."""

    iterator: Iterator
    timer: PathTimer

    def _train(self, batches: TimedBatches) -> int:
        raise NotImplementedError

    def warmup(self, count: int) -> None:
        started = time.perf_counter()
        self._train(TimedBatches(self.iterator, count))
        self.timer.warmup_seconds = time.perf_counter() - started

    def run(self, count: int) -> None:
        batches = TimedBatches(self.iterator, count)
        self.timer.measure(lambda: self._train(batches), batches)


class PipelinePath(TimedPath):
    """The train stage's path; `run(n)` is one `train_one_epoch` call over the next n batches."""

    def __init__(self, params: Params, runtime: Runtime, dataset: Dataset, total_batches: int,
                 compile_model: bool = False, label: str = "pipeline"):
        self.params, self.runtime, self.label = params, runtime, label
        seed_everything(params.train.seed)
        loader = train_loader(dataset.train, params.augment, params.train.batch_size,
                              params.train.seed, runtime)
        self.model = build_model(params.model, runtime, len(dataset.classes), dataset.train.images)
        self.trained = torch.compile(self.model) if compile_model else self.model
        # The real run's OneCycle: epochs x the loader's real length (for synthetic data, the
        # benchmark's own length), so the timed batches sit at the start of the real schedule.
        cycle = onecycle_for(params.train, len(loader), float(params.train.max_lr))   # max_lr resolved in main
        self.optimizer = build_optimizer(self.trained, params.optim, lr=cycle.start_lr)
        self.scheduler = build_scheduler(self.optimizer, cycle, params.train.cycle_momentum)
        self.guard = DivergenceGuard(params.train.diverge_factor, runtime.device)
        self.lrs: list[float] = []
        self.iterator = iter(loader.epoch(1))
        self.timer = PathTimer()
        self.bar = tqdm(total=total_batches, desc=label, leave=False)

    def _train(self, batches: TimedBatches) -> int:
        result = train_one_epoch(self.trained, batches, self.optimizer, self.scheduler, self.runtime,
                                 self.params.optim.label_smoothing, None, self.bar, self.guard, self.lrs)
        return result["images"]

    def close(self) -> None:
        self.bar.close()
        self.iterator = None   # shuts down loader workers, if any


def with_augment_path(params: Params, path: str) -> Params:
    """`params` with `augment.path` set to `path` (alternating flips only where the batch path runs)."""
    augment = dataclasses.replace(params.augment, path=path,
                                  alternate_flip=params.augment.alternate_flip and path == "batch")
    return dataclasses.replace(params, augment=augment)


def other_augment_path(params: Params, runtime: Runtime) -> str:
    return "per_image" if augment_path(params.augment, runtime)[0] == "batch" else "batch"


class StepAlonePath(PipelinePath):
    """The pipeline path without its loader: the same first batches, collated once and already on the
    device, so `run(n)` times the training step alone (one `train_one_epoch` call, no data wait)."""

    def __init__(self, params: Params, runtime: Runtime, dataset: Dataset, total_batches: int):
        super().__init__(params, runtime, dataset, total_batches, label="step alone")
        resident = [to_device(images, labels, runtime) for images, labels in
                    itertools.islice(self.iterator, total_batches)]
        self.iterator = iter(resident)   # ends the loader's iteration (and its workers, if not persistent)


def time_epoch_loop(params: Params, runtime: Runtime, dataset: Dataset, epochs: int) -> dict:
    """The train stage's epoch loop itself: `fit` (cifarlab.pipeline.train) for `epochs` epochs over the benchmark's data,
    run in a scratch directory (a copy of dvc.yaml, which the run fingerprint reads; everything fit
    writes stays there). Returns train_speed.json's per-epoch phase times (see cifarlab.engine.timer)."""
    loop_params = replace(params, train=replace(params.train, epochs=epochs,
                                                max_at_epoch=min(params.train.max_at_epoch, epochs)))
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        shutil.copy2(REPO / "dvc.yaml", Path(tmp) / "dvc.yaml")
        with working_directory(Path(tmp)), contextlib.redirect_stdout(sys.stderr):   # fit's log lines
            fit(loop_params, dataset, runtime)
        speed = json.loads((Path(tmp) / paths.TRAIN_SPEED).read_text())
    return speed


def loop_results(speed: dict, train_images: int) -> dict:
    """Bench keys from the epoch loop's phases: the first epoch alone (worker start-up, first-call
    allocation), then means over the later epochs (all of them when there is one)."""
    phases = speed["epoch_phases"]
    later = phases[1:] or phases

    def mean(name: str) -> float:
        return sum(p[name] for p in later) / len(later)

    out = {"loop_epochs": len(phases), "loop_first_epoch_seconds": phases[0]["seconds"],
           "loop_epoch_seconds": mean("seconds"), "loop_images_per_s": train_images / mean("seconds"),
           "loop_step_images_per_s": train_images / mean("steps")}
    for name in ("steps", "data_wait", "first_batch", "test_pass", "state_save", "other", "overhead"):
        out[f"loop_{name}_seconds"] = mean(name)
    writes = speed.get("state_write_seconds") or [float("nan")]
    out["loop_state_write_seconds"] = sum(writes) / len(writes)   # in the background, during the next epoch
    return out


def time_loader(params: Params, runtime: Runtime, dataset: Dataset, warmup: int, batches: int) -> dict:
    loader = train_loader(dataset.train, params.augment, params.train.batch_size,
                          params.train.seed, runtime)
    iterator = iter(loader.epoch(2))
    for _ in TimedBatches(iterator, warmup):
        pass
    timed = TimedBatches(iterator, batches)
    images = 0
    started = time.perf_counter()
    for images_batch, _ in tqdm(timed, total=batches, desc="loader", leave=False):
        images += len(images_batch)
    seconds = time.perf_counter() - started
    return {"images_per_s": images / seconds, "seconds": seconds}


# --- (b) the seed notebooks' loop ---------------------------------------------------------------

class ReferencePath(TimedPath):
    """The seeds' loop (bench/reference_loop.py) as a timed path; `run(n)` continues it for n batches."""

    def __init__(self, params: Params, device: torch.device, dataset: Dataset, total_batches: int):
        self.loop = SeedStyleLoop(params, device, dataset, total_batches)
        self.iterator = self.loop.iterator
        self.timer = PathTimer()

    def _train(self, batches: TimedBatches) -> int:
        return self.loop.train(batches)

    def close(self) -> None:
        self.loop.close()


# --- eval ---------------------------------------------------------------------------------------

def time_eval(model: torch.nn.Module, test: Split, batch_size: int, runtime: Runtime) -> dict:
    warm = Split(test.images[:batch_size], test.labels[:batch_size])
    evaluate(model, iterate_batches(warm, batch_size), runtime)
    started = time.perf_counter()
    result = evaluate(model, iterate_batches(test, batch_size), runtime)
    seconds = time.perf_counter() - started
    return {"images_per_s": result["count"] / seconds, "seconds": seconds, "images": result["count"]}


def failure(err: Exception) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:200]


def run_training_paths(args, params: Params, runtime: Runtime, dataset: Dataset, out: dict) -> dict:
    """Warm up and time the pipeline, reference and (with --compile) compiled paths.

    Sequentially (default): each path is built, warmed up and timed over all its batches before
    the next is built, and the pipeline path is one `train_one_epoch` call, exactly as the train
    stage makes it. With --interleave: all paths are built and warmed up first, then the timed
    batches alternate one at a time between paths (one `train_one_epoch` call per batch), so a
    change in background load during the run hits every path alike.
    """
    names = (["pipeline", "step_alone"] + ([] if args.skip_reference else ["reference"])
             + (["compiled"] if args.compile else []) + (["other_augment_path"] if args.both_augment_paths else []))
    total = args.warmup + args.batches
    results: dict = {"compile_status": "ok" if args.compile else "not run (pass --compile)"}

    def build_and_warm(name: str):
        log(f"building and warming up the {name} path" + (" (compiling)" if name == "compiled" else ""))
        if name == "reference":
            path = ReferencePath(params, runtime.device, dataset, total)
        elif name == "other_augment_path":
            path = PipelinePath(with_augment_path(params, other_augment_path(params, runtime)), runtime, dataset,
                                total, label=name)
        elif name == "step_alone":
            path = StepAlonePath(params, runtime, dataset, total)
        else:
            path = PipelinePath(params, runtime, dataset, total, compile_model=name == "compiled", label=name)
        path.warmup(args.warmup if name != "compiled" else max(args.warmup, 1))
        if name == "pipeline":
            results["pipeline_model"] = path.model
        return path

    def guarded(name: str, action):
        """Run `action`; a torch.compile failure is recorded as the result, anything else raises."""
        if name != "compiled":
            return action()
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - a compile failure is a result to report, not a crash
            results["compile_status"] = f"failed ({failure(err)})"
            log(f"torch.compile failed: {failure(err)}")
            return None

    paths: dict = {}
    if args.interleave:
        for name in names:
            path = guarded(name, lambda: build_and_warm(name))
            if path is not None:
                paths[name] = path
            if name == "pipeline":
                results["peak_rss_mib_after_pipeline"] = rss_mib()
        log(f"timing {', '.join(paths)} interleaved, one batch at a time")
        for _ in range(args.batches):
            for name in list(paths):
                if guarded(name, lambda: paths[name].run(1) or True) is None:
                    paths.pop(name).close()
    else:
        for name in names:
            path = guarded(name, lambda: build_and_warm(name))
            if path is None:
                continue
            log(f"timing the {name} path")
            if guarded(name, lambda: path.run(args.batches) or True) is not None:
                results[name] = path.timer.results()
            path.close()
            if name == "pipeline":
                results["peak_rss_mib_after_pipeline"] = rss_mib()
            del path   # free its model and optimizer before the next path, as separate runs would
    for name, path in paths.items():
        path.close()
        results[name] = path.timer.results()
    return results


# --- main ---------------------------------------------------------------------------------------

def format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def report_path(out: dict, prefix: str, result: dict, *keys: str) -> None:
    """Copy a training path's `keys` into the output as `<prefix>_<key>`, in the order given;
    `images_per_s` is printed as `<prefix>_train_images_per_s`."""
    for key in keys:
        out[f"{prefix}_{'train_images_per_s' if key == 'images_per_s' else key}"] = result[key]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Output: `key: value` lines on stdout, one per metric (see bench/README.md).")
    parser.add_argument("--batches", type=int, default=6, help="timed batches per training path (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before each timed path (default 2)")
    parser.add_argument("--batch-size", type=int, default=512, help="images per training batch (default 512)")
    parser.add_argument("--data", default="synthetic",
                        help="`synthetic` (default: make_synthetic sized for warmup+batches) or a data dir "
                             "holding train.npz/test.npz/meta.json as the download stage writes it")
    parser.add_argument("--eval-images", type=int, default=2000,
                        help="test images for the eval measurement (default 2000; 0 = the whole test split "
                             "of --data; synthetic needs a positive number)")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params file (default: the repo's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a params key for this run, e.g. --set runtime.precision=fp32 (repeatable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the whole run (default: torch's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the pipeline path with the model wrapped in torch.compile")
    parser.add_argument("--interleave", action="store_true",
                        help="warm up all training paths first, then alternate their timed batches one at a time "
                             "(robust to changing background load; default: time each path in turn)")
    parser.add_argument("--skip-reference", action="store_true", help="do not time the seed-style loop")
    parser.add_argument("--both-augment-paths", action="store_true",
                        help="also time training on the other augmentation path (augment.path per_image vs batch)")
    parser.add_argument("--loop-epochs", type=int, default=3,
                        help="epochs of the train stage's own epoch loop (cifarlab.pipeline.train.fit) to run over the benchmark's "
                             "data, the first reported apart (default 3; 0 = skip)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.warmup < 0 or args.batch_size < 1 or args.loop_epochs < 0:
        parser.error("--batches and --batch-size must be >= 1, --warmup and --loop-epochs >= 0")
    if args.data == "synthetic" and args.eval_images < 1:
        parser.error("--eval-images must be >= 1 with synthetic data")

    if args.threads:
        torch.set_num_threads(args.threads)
    cv2.setNumThreads(0)   # as the seeds do; the pipeline's albumentations work on single images anyway
    wall_started = time.perf_counter()
    load_start = os.getloadavg()[0]
    try:
        params = load_bench_params(args.params, args.overrides, args.batch_size)
        max_lr, max_lr_source = bench_max_lr(params)
        params = replace(params, train=replace(params.train, max_lr=max_lr))
        runtime = select_runtime(params.runtime)
    except CifarlabError as err:   # ParamsError included: one line naming the key
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    needed = (args.warmup + args.batches) * args.batch_size
    dataset = bench_dataset(args.data, params, needed, args.eval_images)

    out: dict = {
        "bench": "throughput", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cuda_device": torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else None,
        "model": params.model.name, "batch_size": args.batch_size, "timed_batches": args.batches,
        "warmup_batches": args.warmup, "data": dataset.source if args.data == "synthetic" else str(args.data),
        "overrides": " ".join(args.overrides) or "none", "interleave": args.interleave,
        "device": str(runtime.device), "precision": runtime.precision, "channels_last": runtime.channels_last,
        "num_workers": runtime.num_workers, "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count(),
        "cpu": describe_cpu(), "cpu_bf16": cpu_supports_bf16(), "torch": torch.__version__,
        "max_lr": max_lr, "max_lr_source": max_lr_source,
    }
    log(f"{params.model.name} batch {args.batch_size}: {args.warmup} warmup + {args.batches} timed batches per path, "
        f"{runtime.device} {runtime.precision} channels_last={runtime.channels_last} workers={runtime.num_workers} "
        f"threads={torch.get_num_threads()}")

    configured, why = augment_path(params.augment, runtime)
    out["augment_path"] = f"{configured} ({why})"
    for path in ("per_image", "batch"):
        log(f"timing the {path} augmentation path's loader alone")
        loader = time_loader(with_augment_path(params, path), runtime, dataset, args.warmup, args.batches)
        out[f"loader_{path}_images_per_s"] = loader["images_per_s"]
    out["loader_images_per_s"] = out[f"loader_{configured}_images_per_s"]

    timed = run_training_paths(args, params, runtime, dataset, out)
    pipeline = timed["pipeline"]
    report_path(out, "pipeline", pipeline, "images_per_s", "step_ms", "data_wait_share", "data_wait_ms_per_batch",
                "cores_used")
    out["peak_rss_mib_after_pipeline"] = timed["peak_rss_mib_after_pipeline"]
    report_path(out, "step_alone", timed["step_alone"], "images_per_s", "step_ms")
    if "reference" in timed:
        reference = timed["reference"]
        report_path(out, "reference", reference, "images_per_s", "step_ms", "data_wait_share", "cores_used")
        out["ratio_pipeline_over_reference"] = pipeline["images_per_s"] / reference["images_per_s"]
    else:
        out["reference_train_images_per_s"] = "skipped"
        out["ratio_pipeline_over_reference"] = "skipped"

    log("timing loops.evaluate on the test split")
    evaluation = time_eval(timed["pipeline_model"], dataset.test, params.evaluate.batch_size, runtime)
    out["eval_images_per_s"] = evaluation["images_per_s"]
    out["eval_images"] = evaluation["images"]
    out["eval_seconds"] = evaluation["seconds"]
    del timed["pipeline_model"]

    if args.loop_epochs:
        log(f"running the train stage's epoch loop (cifarlab.pipeline.train.fit) for {args.loop_epochs} epochs")
        out.update(loop_results(time_epoch_loop(params, runtime, dataset, args.loop_epochs), len(dataset.train)))
        out["loop_over_step_alone"] = out["loop_images_per_s"] / out["step_alone_train_images_per_s"]
    else:
        out["loop_epochs"] = "skipped"

    if "other_augment_path" in timed:
        other = timed["other_augment_path"]
        out["other_augment_path"] = other_augment_path(params, runtime)
        report_path(out, "other_augment_path", other, "images_per_s", "data_wait_share")
    out["compile_status"] = timed["compile_status"]
    if "compiled" in timed:
        compiled = {**timed["compiled"], "speedup": timed["compiled"]["images_per_s"] / pipeline["images_per_s"]}
        report_path(out, "compile", compiled, "warmup_seconds", "images_per_s", "speedup", "data_wait_share",
                    "cores_used")
        out["compile_helps"] = out["compile_speedup"] > 1.05

    out["peak_rss_mib"] = rss_mib()
    out["peak_rss_children_mib"] = rss_mib(resource.RUSAGE_CHILDREN)
    out["cuda_max_memory_allocated_mib"] = (torch.cuda.max_memory_allocated() / 2**20
                                            if runtime.device.type == "cuda" else "n/a")
    out["loadavg_1min_start"] = load_start
    out["loadavg_1min_end"] = os.getloadavg()[0]
    out["wall_seconds"] = time.perf_counter() - wall_started

    for name, value in out.items():
        print(f"{name}: {format_value(value)}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
