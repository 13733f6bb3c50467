"""evaluate stage: the trained checkpoint on the held-out test split only."""

import numpy as np

from cifarlab import paths
from cifarlab.atomic import atomic_path, save_figure, write_json
from cifarlab.checkpoint import load_checkpoint
from cifarlab.data import iterate_batches, load_dataset
from cifarlab.engine import evaluate, prepare_model, select_runtime
from cifarlab.errors import run_stage
from cifarlab.metrics import confusion_matrix, most_confident_mistakes, per_class_accuracy
from cifarlab.params import load_params
from cifarlab.plots import confusion_figure, gallery_figure


def main() -> None:
    params = load_params()
    runtime = select_runtime(params.runtime)
    dataset = load_dataset(paths.DATA_DIR)   # checks the test split's size for the source
    model, checkpoint = load_checkpoint(paths.CHECKPOINT)
    model = prepare_model(model, runtime)
    result = evaluate(model, iterate_batches(dataset.test, params.evaluate.batch_size), runtime)

    target, predicted = result["target"].numpy(), result["predicted"].numpy()
    matrix = confusion_matrix(target, predicted, len(dataset.classes))
    write_json(paths.EVAL_METRICS, {
        "accuracy": result["accuracy"], "loss": result["loss"], "test_images": result["count"],
        "split": "test", "data_source": dataset.source, "arch": checkpoint["arch"],
        "per_class_accuracy": per_class_accuracy(matrix, dataset.classes)})
    with atomic_path(paths.CONFUSION) as tmp:
        tmp.write_text("actual,predicted\n" + "".join(
            f"{dataset.classes[t]},{dataset.classes[p]}\n" for t, p in zip(target, predicted)))
    save_figure(confusion_figure(matrix, dataset.classes), paths.CONFUSION_FIGURE, dpi=120)

    mistakes = most_confident_mistakes(target, predicted, result["confidence"].numpy(), params.evaluate.gallery_size)
    captions = [f"true {dataset.classes[target[i]]}\npred {dataset.classes[predicted[i]]} "
                f"({100 * float(result['confidence'][i]):.0f}%)" for i in mistakes]
    save_figure(gallery_figure(dataset.test.images[mistakes] if len(mistakes) else np.empty((0, 32, 32, 3)),
                               captions, "Misclassified test images (most confident first)"),
                paths.MISCLASSIFIED_FIGURE, dpi=120)
    print(f"evaluate: test accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} "
          f"on {result['count']} {dataset.source} test images")


if __name__ == "__main__":
    run_stage(main)
