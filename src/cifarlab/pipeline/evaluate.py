"""The evaluate stage's work: the trained checkpoint on the held-out test split only.

Every measurement goes through `loops.evaluate`: the plain model, and the test-time augmentations
switched on in `evaluate.*` (`tta_hflip`: each image and its mirror image; `tta_translate`: those
and their 1-pixel shifts, six views), each reported under its own key beside the plain figures,
never instead of them. Writes the test figures (metrics/evaluate.json, the
`dvc exp show` summary metrics/test.json), the per-class and confusion plots, the gallery of the
most confident mistakes and their Grad-CAM maps, and the run details (metrics/evaluate_run.json).
Every pass runs on the runtime's device: the measurements in its precision (autocast), over the test
split copied to the device once; Grad-CAM on an fp32 copy of the model on the same device
(`cifarlab.engine.gradcam` says why not in reduced precision).
"""

from __future__ import annotations

import time

from cifarlab import paths
from cifarlab.atomic import atomic_path, save_figure, write_json
from cifarlab.config.params import Params
from cifarlab.data.loaders import ResidentBatches
from cifarlab.data.subset import load_subset
from cifarlab.engine.checkpoint import load_checkpoint
from cifarlab.engine.classifier import prepare_model
from cifarlab.engine.gradcam import cam_layer_name, grad_cam, PRECISION as GRADCAM_PRECISION
from cifarlab.engine.loops import evaluate
from cifarlab.engine.metrics import TTA_VARIANTS, confusion_matrix, most_confident_mistakes, per_class_accuracy
from cifarlab.engine.runtime import select_runtime
from cifarlab.pipeline.plots import confusion_figure, gallery_figure, gradcam_figure, per_class_figure


def evaluate_checkpoint(params: Params) -> dict:
    """Measure models/model.pt on the test split and write every evaluate output (see the module doc);
    returns the test figures written to metrics/evaluate.json."""
    started = time.perf_counter()
    settings = params.evaluate
    runtime = select_runtime(params.runtime)
    # data/ is checked whole (the test split's size for the source), then cut to data.test_subset (0 = all)
    dataset = load_subset(paths.DATA_DIR, test=params.data.test_subset)
    classes = dataset.classes
    model, checkpoint = load_checkpoint(paths.CHECKPOINT)
    model = prepare_model(model, runtime)   # Grad-CAM makes its own fp32 copy on the same device
    test_batches = ResidentBatches(dataset.test, settings.batch_size, runtime.device)   # one copy for every pass

    timer = time.perf_counter()
    result = evaluate(model, test_batches, runtime)
    seconds = {"plain": time.perf_counter() - timer}
    target, predicted = result["target"].numpy(), result["predicted"].numpy()
    confidence = result["confidence"].numpy()
    metrics = {"accuracy": result["accuracy"], "loss": result["loss"], "correct": int((predicted == target).sum()),
               "test_images": result["count"], "split": "test", "data_source": dataset.source,
               "arch": checkpoint["arch"]}
    for name, wrapper in TTA_VARIANTS.items():
        if not getattr(settings, name):
            continue
        timer = time.perf_counter()
        tta = evaluate(wrapper(model), test_batches, runtime)
        seconds[name] = time.perf_counter() - timer
        metrics[name] = {"accuracy": tta["accuracy"], "loss": tta["loss"],
                         "correct": int((tta["predicted"] == tta["target"]).sum())}
    matrix = confusion_matrix(target, predicted, len(classes))
    metrics["per_class_accuracy"] = per_class_accuracy(matrix, classes)
    write_json(paths.EVAL_METRICS, metrics)
    # What `dvc exp show` compares: the test figures only, each once (the rest are run details above).
    write_json(paths.TEST_SUMMARY, {key: metrics[key] for key in ("accuracy", "loss")} | {
        name: {key: metrics[name][key] for key in ("accuracy", "loss")} for name in TTA_VARIANTS if name in metrics})
    with atomic_path(paths.PER_CLASS) as tmp:
        tmp.write_text("class,accuracy\n" + "".join(
            f"{name},{value!r}\n" for name, value in metrics["per_class_accuracy"].items()))

    with atomic_path(paths.CONFUSION) as tmp:
        tmp.write_text("actual,predicted\n" + "".join(
            f"{classes[t]},{classes[p]}\n" for t, p in zip(target, predicted)))
    save_figure(confusion_figure(matrix, classes), paths.CONFUSION_FIGURE, dpi=120)
    save_figure(per_class_figure(metrics["per_class_accuracy"], result["accuracy"],
                                 f"Per-class test accuracy ({result['count']} {dataset.source} test images)"),
                paths.PER_CLASS_FIGURE, dpi=120)

    ranked = most_confident_mistakes(target, predicted, confidence, max(settings.gallery_size, settings.gradcam_size))
    captions = {i: f"test #{i}: true {classes[target[i]]}\npred {classes[predicted[i]]} ({100 * confidence[i]:.0f}%)"
                for i in ranked}
    wrong = result["count"] - metrics["correct"]
    empty = "no misclassified test images" if wrong == 0 else "none shown (evaluate.{} is 0)"
    gallery = ranked[:settings.gallery_size]
    save_figure(gallery_figure(dataset.test.images[gallery], [captions[i] for i in gallery],
                               f"Misclassified test images, most confident first ({len(gallery)} of {wrong} mistakes)",
                               empty_message=empty.format("gallery_size")),
                paths.MISCLASSIFIED_FIGURE, dpi=120)

    timer = time.perf_counter()
    shown = ranked[:settings.gradcam_size]
    layer = cam_layer_name(model)
    images = dataset.test.images[shown]
    cams_predicted = grad_cam(model, images, predicted[shown])
    cams_true = grad_cam(model, images, target[shown])
    seconds["gradcam"] = time.perf_counter() - timer
    save_figure(gradcam_figure(images, cams_predicted, cams_true, [captions[i] for i in shown],
                               [classes[c] for c in predicted[shown]], [classes[c] for c in target[shown]],
                               f'Grad-CAM at layer "{layer}" on the {len(shown)} most confident mistakes '
                               f'({GRADCAM_PRECISION}, {runtime.device.type.upper()})'
                               if len(shown) else f'Grad-CAM at layer "{layer}"',
                               empty_message=empty.format("gradcam_size")),
                paths.GRADCAM_FIGURE, dpi=120)

    seconds["total"] = time.perf_counter() - started
    write_json(paths.EVAL_RUN, {
        "seconds": seconds, "images_per_second": result["count"] / seconds["plain"],
        **runtime.describe(), "gradcam_layer": layer,
        "gradcam_device": str(runtime.device), "gradcam_precision": GRADCAM_PRECISION,   # whatever runtime.precision is
        "gallery_images": int(len(gallery)), "gradcam_images": int(len(shown)),
        "params": {"evaluate": params.to_dict()["evaluate"]}})
    tta_line = "".join(f"; with {name} {metrics[name]['accuracy']:.4f}, loss {metrics[name]['loss']:.4f}"
                       for name in TTA_VARIANTS if name in metrics)
    print(f"evaluate: test accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f} "
          f"on {result['count']} {dataset.source} test images{tta_line}")
    return metrics
