"""lr_find stage: LR range test with the training model, optimizer, batch size and augmentation."""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

from cifarlab import paths
from cifarlab.atomic import atomic_path, write_json
from cifarlab.augment import build_train_transform
from cifarlab.engine import build_model, seed_everything, select_runtime, train_loader
from cifarlab.errors import run_stage
from cifarlab.lr_finder import range_test
from cifarlab.lr_rules import suggestions, window
from cifarlab.params import load_params
from cifarlab.schedule import build_optimizer
from cifarlab.subset import load_subset


def main() -> None:
    params = load_params()
    runtime = select_runtime(params.runtime)
    dataset = load_subset(paths.DATA_DIR, train=params.data.train_subset)
    seed_everything(params.train.seed)
    loader = train_loader(dataset.train, build_train_transform(params.augment), params.train.batch_size,
                          params.train.seed, runtime)
    model = build_model(params.model, runtime, len(dataset.classes))
    optimizer = build_optimizer(model, params.optim, lr=params.lr_find.start_lr)
    lrs, losses = range_test(model, optimizer, loader.epoch(0), runtime, params.lr_find,
                             params.optim.label_smoothing)
    descent = window(lrs, losses)          # a curve with no usable descent stops here with one line
    candidates = suggestions(descent)
    rule = params.lr_find.rule
    max_lr = candidates[rule]
    with atomic_path(paths.LR_FIND_CURVE) as tmp:
        tmp.write_text("lr,loss\n" + "".join(f"{lr!r},{loss!r}\n" for lr, loss in zip(lrs, losses)))
    write_json(paths.LR_FIND_METRICS, {
        "max_lr": max_lr, "rule": rule, "suggestions": candidates, "loss_minimum_lr": descent.minimum_lr,
        "window": list(descent.bounds), "iterations": len(lrs),
        "stopped_early": len(lrs) < params.lr_find.num_iter})
    print(f"lr_find: max_lr {max_lr:.3e} by rule `{rule}` "
          f"({', '.join(f'{k} {v:.2e}' for k, v in candidates.items())}; loss minimum at {descent.minimum_lr:.2e}, "
          f"{len(lrs)} of {params.lr_find.num_iter} iterations)")


if __name__ == "__main__":
    run_stage(main)
