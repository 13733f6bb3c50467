"""`python -m cifarlab export` of the tiny run's trained model (conftest.tiny_run): TorchScript and ONNX
give the PyTorch model's logits on real test images, and say their input convention in their metadata."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from cifarlab.data.storage import CIFAR_MEAN, CIFAR_STD
from cifarlab.engine.checkpoint import load_checkpoint
from cifarlab.tools import export
from cifarlab.tools.export import main, read_metadata


@pytest.fixture(scope="module")
def model_path(tiny_run):
    return tiny_run / "models" / "model.pt"


@pytest.fixture(scope="module")
def reference(tiny_run, model_path):
    """Seven real test images in the input convention (float32 NCHW, 0..255) and the PyTorch model's logits."""
    with np.load(tiny_run / "data" / "test.npz") as data:
        batch = torch.from_numpy(data["images"][:7]).permute(0, 3, 1, 2).float()
    model, state = load_checkpoint(model_path)
    with torch.no_grad():
        return batch, model.eval()(batch).numpy(), state


def assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def check_metadata(meta: dict, state: dict, model_path):
    assert json.loads(meta["classes"]) == state["classes"] and meta["arch"] == state["arch"] == "a7_net"
    assert json.loads(meta["mean"]) == list(CIFAR_MEAN) and json.loads(meta["std"]) == list(CIFAR_STD)
    assert (meta["input_layout"], meta["input_dtype"], meta["channel_order"]) == ("NCHW", "float32", "RGB")
    assert meta["input_range"].startswith("0..255") and meta["input_shape"] == "[N, 3, 32, 32]"
    assert (meta["input_name"], meta["output_name"], meta["source"]) == ("images", "logits", str(model_path))


@pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:FutureWarning")   # TorchScript is asked for
def test_torchscript_gives_the_models_logits_and_says_its_input(tmp_path, model_path, reference, capsys):
    batch, want, state = reference
    target = tmp_path / "model.torchscript.pt"
    assert main(["--model", str(model_path), "--torchscript", str(target)]) == 0
    assert f"torchscript: {target} (torch.jit.load; logits within" in capsys.readouterr().out
    extra = {"cifarlab.json": ""}
    loaded = torch.jit.load(str(target), _extra_files=extra)
    with torch.no_grad():
        assert_close(loaded(batch).numpy(), want)
        assert_close(loaded(batch[:1]).numpy(), want[:1])      # another batch size than the trace's
    meta = json.loads(extra["cifarlab.json"])
    check_metadata(meta, state, model_path)
    assert read_metadata(target) == meta


def test_onnx_gives_the_models_logits_and_says_its_input(tmp_path, model_path, reference, capsys):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[export]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install -e '.[export]')")
    batch, want, state = reference
    target = tmp_path / "model.onnx"
    assert main(["--model", str(model_path), "--onnx", str(target)]) == 0
    assert f"onnx: {target} (onnxruntime: logits within" in capsys.readouterr().out
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("images", "tensor(float)")]
    for images, logits in ((batch, want), (batch[:1], want[:1])):    # a dynamic batch axis
        assert_close(session.run(["logits"], {"images": images.numpy()})[0], logits)
    meta = session.get_modelmeta().custom_metadata_map
    check_metadata(meta, state, model_path)
    assert read_metadata(target) == meta


def test_without_onnx_the_line_says_how_to_install_it(tmp_path, model_path, monkeypatch, capsys):
    for name in ("onnx", "onnxscript"):
        monkeypatch.setitem(sys.modules, name, None)        # `import onnx` raises ImportError
    target = tmp_path / "model.onnx"
    assert main(["--model", str(model_path), "--onnx", str(target)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        'error: ONNX export needs onnx, onnxscript, not installed here: pip install -e ".[export]" '
        '(or pip install onnx onnxscript)']
    assert not target.exists()


def test_an_export_that_disagrees_with_the_model_is_not_written(tmp_path, model_path, monkeypatch, capsys):
    real = export.reference_logits
    monkeypatch.setattr(export, "reference_logits", lambda loaded, batch: real(loaded, batch) + 0.5)
    target = tmp_path / "model.torchscript.pt"
    assert main(["--model", str(model_path), "--torchscript", str(target)]) == 1
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: the TorchScript export {target} disagrees with the PyTorch model")
    assert line.endswith("; not written") and list(tmp_path.iterdir()) == []


def test_bad_requests_are_one_line(tmp_path, model_path, capsys):
    assert main(["--model", str(model_path)]) == 1
    assert capsys.readouterr().err == "error: nothing to export: name --onnx PATH, --torchscript PATH or both\n"
    assert main(["--model", str(tmp_path / "none.pt"), "--torchscript", str(tmp_path / "m.pt")]) == 1
    assert capsys.readouterr().err.startswith(f"error: checkpoint {tmp_path / 'none.pt'} does not exist")
