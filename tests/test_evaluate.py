"""The evaluate stage on a tiny synthetic run: plain and TTA figures side by side, per-class accuracy
consistent with the confusion matrix, the test split only, gallery sizes from params, Grad-CAM."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from cifarlab.engine.classifier import Classifier
from cifarlab.engine.gradcam import cam_layer_name, grad_cam
from cifarlab.engine.metrics import HorizontalFlipTTA
from cifarlab.models.names import model_names
from cifarlab.models.registry import model_spec
from conftest import TINY, TINY_RUN_EVALUATE, merge, run_script, write_params

EVALUATE = TINY_RUN_EVALUATE   # gallery 6, Grad-CAM 4, TTA on: the shared tiny run's settings
FIGURES = ("plots/confusion.png", "plots/per_class.png", "plots/misclassified.png", "plots/gradcam.png")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tiny(tiny_run) -> Path:
    """download -> lr_find -> train -> evaluate (-> report) on the tiny synthetic set (conftest.tiny_run)."""
    return tiny_run


@pytest.fixture(scope="module")
def plain(tiny, tmp_path_factory) -> Path:
    """The same checkpoint evaluated again with TTA off and both galleries empty."""
    work = tmp_path_factory.mktemp("evaluate_plain") / "work"
    shutil.copytree(tiny, work, ignore=shutil.ignore_patterns("metrics", "plots"))
    params = yaml.safe_load((tiny / "params.yaml").read_text())
    write_params(work, merge(params, {"evaluate": {"gallery_size": 0, "gradcam_size": 0, "tta_hflip": False,
                                                   "tta_translate": False}}))
    run_script(work, "stages/evaluate.py")
    return work


def confusion(work: Path, classes: list[str]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    with (work / "plots/confusion.csv").open() as handle:
        rows = [(row["actual"], row["predicted"]) for row in csv.DictReader(handle)]
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for actual, predicted in rows:
        matrix[index[actual], index[predicted]] += 1
    return matrix, rows


# --- the stage's outputs ------------------------------------------------------------------------

def test_the_tiny_run_learns_the_synthetic_set_but_not_perfectly(tiny):
    """The synthetic classes overlap: the tiny run ends well above chance (0.1) and well below 100%,
    so the mistakes gallery, Grad-CAM and the confusion matrix show real content."""
    metrics = read_json(tiny / "metrics/evaluate.json")
    assert 0.5 <= metrics["accuracy"] <= 0.9, metrics["accuracy"]
    assert read_json(tiny / "metrics/evaluate_run.json")["gallery_images"] == EVALUATE["gallery_size"]


def test_tta_figures_are_beside_the_plain_ones(tiny):
    metrics = read_json(tiny / "metrics/evaluate.json")
    assert {"accuracy", "loss", "correct", "tta_hflip", "tta_translate"} <= metrics.keys()
    assert set(metrics["tta_hflip"]) == set(metrics["tta_translate"]) == {"accuracy", "loss", "correct"}
    for figures in (metrics, metrics["tta_hflip"], metrics["tta_translate"]):
        assert 0.0 <= figures["accuracy"] <= 1.0 and figures["loss"] > 0
        assert figures["accuracy"] == pytest.approx(figures["correct"] / metrics["test_images"])


def test_tta_never_replaces_the_plain_figures(tiny, plain):
    with_tta, without = read_json(tiny / "metrics/evaluate.json"), read_json(plain / "metrics/evaluate.json")
    assert "tta_hflip" not in without and "tta_translate" not in without
    assert (with_tta["accuracy"], with_tta["loss"], with_tta["correct"]) == \
        (without["accuracy"], without["loss"], without["correct"])
    assert with_tta["per_class_accuracy"] == without["per_class_accuracy"]


def test_per_class_accuracy_agrees_with_the_confusion_matrix(tiny):
    metrics = read_json(tiny / "metrics/evaluate.json")
    classes = read_json(tiny / "data/meta.json")["classes"]
    assert list(metrics["per_class_accuracy"]) == classes
    matrix, _ = confusion(tiny, classes)
    assert matrix.sum() == metrics["test_images"]
    assert np.trace(matrix) == metrics["correct"]
    for i, name in enumerate(classes):
        assert metrics["per_class_accuracy"][name] == pytest.approx(matrix[i, i] / matrix[i].sum())
    # per-class correct counts add up to the overall accuracy
    assert sum(metrics["per_class_accuracy"][name] * matrix[i].sum() for i, name in enumerate(classes)) == \
        pytest.approx(metrics["accuracy"] * metrics["test_images"])


def test_only_the_test_split_is_measured(tiny):
    metrics = read_json(tiny / "metrics/evaluate.json")
    assert metrics["split"] == "test" and metrics["data_source"] == "synthetic"
    assert metrics["test_images"] == TINY["data"]["synthetic_test_size"] != TINY["data"]["synthetic_train_size"]
    classes = read_json(tiny / "data/meta.json")["classes"]
    _, rows = confusion(tiny, classes)
    with np.load(tiny / "data/test.npz") as test:
        labels = test["labels"]
    assert [actual for actual, _ in rows] == [classes[label] for label in labels]   # the test split, in order


def test_gallery_sizes_follow_params(tiny, plain):
    for work in (tiny, plain):
        settings = yaml.safe_load((work / "params.yaml").read_text())["evaluate"]
        metrics, record = read_json(work / "metrics/evaluate.json"), read_json(work / "metrics/evaluate_run.json")
        wrong = metrics["test_images"] - metrics["correct"]
        assert wrong > 0
        assert record["gallery_images"] == min(settings["gallery_size"], wrong)
        assert record["gradcam_images"] == min(settings["gradcam_size"], wrong)
        assert record["params"]["evaluate"] == settings
    assert read_json(tiny / "metrics/evaluate_run.json")["gallery_images"] == EVALUATE["gallery_size"]
    assert read_json(tiny / "metrics/evaluate_run.json")["gradcam_images"] == EVALUATE["gradcam_size"]


def test_gradcam_uses_the_registry_layer_in_fp32_on_the_runtime_device(tiny):
    record = read_json(tiny / "metrics/evaluate_run.json")
    arch = read_json(tiny / "metrics/evaluate.json")["arch"]
    assert record["gradcam_layer"] == model_spec(arch).cam_layer
    assert (record["gradcam_device"], record["gradcam_precision"]) == (record["device"], "fp32")
    assert record["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert {"plain", "tta_hflip", "tta_translate", "gradcam", "total"} <= record["seconds"].keys()


def test_figures_are_written(tiny, plain):
    from PIL import Image

    sizes = {}
    for work in (tiny, plain):
        for name in FIGURES:
            with Image.open(work / name) as image:
                assert image.format == "PNG"
                sizes[work, name] = image.size
    # a Grad-CAM figure with images is far taller than the "none shown" one
    assert sizes[tiny, "plots/gradcam.png"][1] > 3 * sizes[plain, "plots/gradcam.png"][1]


# --- the pieces ---------------------------------------------------------------------------------

class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(x.float().flatten(1))


def test_hflip_tta_returns_log_of_the_mean_probability():
    torch.manual_seed(0)
    model, x = _Linear(), torch.randn(6, 3, 4, 4)
    expected = (model(x).softmax(1) + model(torch.flip(x, dims=(3,))).softmax(1)) / 2
    out = HorizontalFlipTTA(model)(x)
    assert torch.allclose(out.softmax(1), expected, atol=1e-6)
    assert torch.allclose(out.exp().sum(1), torch.ones(6), atol=1e-6)
    mirror_symmetric = x + torch.flip(x, dims=(3,))
    assert torch.allclose(HorizontalFlipTTA(model)(mirror_symmetric).softmax(1),
                          model(mirror_symmetric).softmax(1), atol=1e-6)


@pytest.mark.parametrize("name", model_names())
def test_grad_cam_works_for_every_registered_model(name):
    torch.manual_seed(0)
    model = Classifier(name).to(memory_format=torch.channels_last)   # as a reduced-precision runtime leaves it
    model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    heat = grad_cam(model, images, [0, 4, 9])
    assert cam_layer_name(model) == model_spec(name).cam_layer
    assert heat.shape == (3, 32, 32) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0 + 1e-6
    assert model.training                                            # the caller's model is untouched
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert grad_cam(model, images[:0], []).shape == (0, 32, 32)


def test_grad_cam_is_fp32_on_the_models_device_under_any_autocast():
    """grad_cam switches autocast off, so a caller inside bf16 autocast (as evaluate runs) gets the fp32
    maps, on the model's device."""
    torch.manual_seed(0)
    model = Classifier("a7_net").to(memory_format=torch.channels_last)
    images = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    seen = []
    model.cam_layer().register_forward_hook(
        lambda module, args, output: seen.append((output.device, output.dtype)))   # copied with the model
    plain = grad_cam(model, images, [1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = grad_cam(model, images, [1, 2])
    assert np.array_equal(plain, under_autocast)
    assert seen and set(seen) == {(torch.device("cpu"), torch.float32)}


class _GapHead(nn.Module):
    """A 1x1 conv (the Grad-CAM layer, full resolution), global average pooling and a linear head:
    the gradient of logit c over channel k is W[c, k] / (32 * 32) at every pixel, so its Grad-CAM is
    the positive part of sum_k W[c, k] * A_k, scaled to [0, 1], with nothing upsampled."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=1)
        self.fc = nn.Linear(4, 10)

    def cam_layer(self) -> nn.Module:
        return self.conv

    def forward(self, x):
        return self.fc(self.conv(x / 255).mean(dim=(2, 3)))


def test_grad_cam_is_the_gradient_weighted_activation_map():
    torch.manual_seed(0)
    model = _GapHead()
    images = np.random.default_rng(2).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    classes = [2, 7, 7]
    heat = grad_cam(model, images, classes)
    with torch.no_grad():
        activations = model.conv(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
        expected = torch.einsum("nk,nkhw->nhw", model.fc.weight[classes], activations).relu()
        low = expected.amin(dim=(1, 2), keepdim=True)
        expected = (expected - low) / (expected - low).amax(dim=(1, 2), keepdim=True)
    assert np.allclose(heat, expected.numpy(), atol=1e-5)
    assert not np.allclose(heat[1], heat[2])                  # one map per image, not per class


def test_declared_metrics_and_per_class_plot_repeat_the_full_record(tiny, plain):
    """metrics/test.json (the `dvc exp show` columns) holds accuracy and loss, the TTA pair beside
    them only when enabled; plots/per_class.csv is the per-class accuracy as a bar-plot table."""
    for work, tta in ((tiny, True), (plain, False)):
        full, declared = read_json(work / "metrics/evaluate.json"), read_json(work / "metrics/test.json")
        expected = {"accuracy": full["accuracy"], "loss": full["loss"]}
        if tta:
            expected |= {name: {key: full[name][key] for key in ("accuracy", "loss")}
                         for name in ("tta_hflip", "tta_translate")}
        assert declared == expected
        with open(work / "plots/per_class.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [row["class"] for row in rows] == list(full["per_class_accuracy"])
        assert [float(row["accuracy"]) for row in rows] == list(full["per_class_accuracy"].values())
