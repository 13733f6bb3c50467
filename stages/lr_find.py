"""lr_find stage: LR range test with the training model, optimizer, batch size and augmentation."""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

from cifarlab import paths
from cifarlab.atomic import atomic_path, save_figure, write_json
from cifarlab.augment import build_train_transform
from cifarlab.data import load_dataset
from cifarlab.engine import build_model, seed_everything, select_runtime, train_loader
from cifarlab.errors import run_stage
from cifarlab.lr_finder import loss_minimum_lr, range_test, suggestions
from cifarlab.params import load_params
from cifarlab.plots import lr_find_figure
from cifarlab.schedule import build_optimizer


def main() -> None:
    params = load_params()
    runtime = select_runtime(params.runtime)
    dataset = load_dataset(paths.DATA_DIR)
    seed_everything(params.train.seed)
    loader = train_loader(dataset.train, build_train_transform(params.augment), params.train.batch_size,
                          params.train.seed, runtime)
    model = build_model(params.model, runtime, len(dataset.classes))
    optimizer = build_optimizer(model, params.optim, lr=params.lr_find.start_lr)
    lrs, losses = range_test(model, optimizer, loader.epoch(0), runtime, params.lr_find,
                             params.optim.label_smoothing)

    candidates = suggestions(lrs, losses)
    rule = params.lr_find.rule
    max_lr = candidates[rule]
    minimum = loss_minimum_lr(lrs, losses)
    with atomic_path(paths.LR_FIND_CURVE) as tmp:
        tmp.write_text("lr,loss\n" + "".join(f"{lr!r},{loss!r}\n" for lr, loss in zip(lrs, losses)))
    save_figure(lr_find_figure(lrs, losses, candidates, rule, minimum), paths.LR_FIND_FIGURE, dpi=120)
    write_json(paths.LR_FIND_METRICS, {
        "max_lr": max_lr, "min_lr": max_lr / params.train.div_factor, "rule": rule,
        "suggestions": candidates, "loss_minimum_lr": minimum, "iterations": len(lrs)})
    print(f"lr_find: max_lr {max_lr:.3e} by rule `{rule}` "
          f"({', '.join(f'{k} {v:.2e}' for k, v in candidates.items())}; loss minimum at {minimum:.2e})")


if __name__ == "__main__":
    run_stage(main)
