"""Export a trained model to TorchScript and ONNX, with its input convention written into the file.

    python -m cifarlab export --onnx model.onnx --torchscript model.torchscript.pt
    python -m cifarlab export --exp a10 --onnx a10.onnx      # experiment a10's model, read through DVC

The exported graph is the whole model, normalisation included: input `images`, float32 NCHW
[N, 3, 32, 32] (any N), RGB, pixel values 0..255; output `logits` [N, number of classes]. The same
metadata goes into both files (ONNX: `metadata_props`; TorchScript: the extra file `cifarlab.json`),
every value a string: the input convention (`cifarlab.tools.predict.INPUT_CONVENTION`), the classes
in output order, the architecture and where the model came from; `read_metadata` reads it back.
Each file is loaded back before it is put in place (ONNX with onnxruntime, where installed) and its
logits compared with the PyTorch model's on a batch: a file that disagrees is not written.
ONNX needs the `export` extra: `pip install -e ".[export]"` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cifarlab import __version__
from cifarlab.atomic import atomic_path
from cifarlab.errors import CifarlabError
from cifarlab.tools.predict import INPUT_CONVENTION, SIDE, LoadedModel, load_model, model_arguments, one_line

INPUT_NAME, OUTPUT_NAME = "images", "logits"
TORCHSCRIPT_METADATA = "cifarlab.json"      # the extra file of a TorchScript export that holds the metadata
ONNX_NEEDS = ("onnx", "onnxscript")         # torch's ONNX exporter; onnxruntime (optional) checks the result
INSTALL = 'pip install -e ".[export]"'
CHECK_BATCH = 5                             # images the exported logits are compared on (not the export's batch)


def metadata(loaded: LoadedModel) -> dict[str, str]:
    """What an exported file says about itself: every value a string (ONNX metadata is strings)."""
    state = loaded.state
    info = {"producer": f"cifarlab {__version__}", "arch": loaded.arch, "classes": list(loaded.classes),
            "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, **INPUT_CONVENTION,
            "source": loaded.source, "epoch": state.get("epoch"), "data_source": state.get("data_source")}
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in info.items()}


def check_batch(count: int = CHECK_BATCH, seed: int = 0) -> "torch.Tensor":   # noqa: F821
    """A fixed batch in the input convention: random 8-bit pixel values as float32 NCHW."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, SIDE, SIDE), generator=generator).float()


def reference_logits(loaded: LoadedModel, batch: "torch.Tensor") -> np.ndarray:   # noqa: F821
    import torch

    with torch.no_grad():
        return loaded.model(batch).float().numpy()


def _agree(kind: str, target: Path, got: np.ndarray, want: np.ndarray) -> float:
    """The largest logit difference; a CifarlabError (the file is not written) beyond float tolerance."""
    difference = float(np.abs(got - want).max())
    tolerance = 1e-4 * max(1.0, float(np.abs(want).max()))
    if got.shape != want.shape or not difference <= tolerance:
        raise CifarlabError(f"the {kind} export {target} disagrees with the PyTorch model (logits {got.shape} vs "
                            f"{want.shape}, largest difference {difference:.3g} > {tolerance:.3g}); not written")
    return difference


def export_torchscript(loaded: LoadedModel, target: str | Path) -> float:
    """Trace the model to TorchScript at `target`, metadata in its extra file; returns the largest
    logit difference from the PyTorch model on `check_batch()`."""
    import torch

    target = Path(target)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")   # TorchScript is asked for
        traced = torch.jit.trace(loaded.model.cpu(), check_batch(2, seed=1), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata(loaded))})
    batch = check_batch()
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer.getvalue())
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
            got = torch.jit.load(str(tmp), map_location="cpu")(batch).float().numpy()
        return _agree("TorchScript", target, got, reference_logits(loaded, batch))


def _require(modules: Sequence[str], what: str) -> None:
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise CifarlabError(f"{what} needs {', '.join(missing)}, not installed here: {INSTALL} "
                            f"(or pip install {' '.join(missing)})")


def export_onnx(loaded: LoadedModel, target: str | Path) -> Optional[float]:
    """Export the model to ONNX at `target` (torch's exporter, a dynamic batch axis), metadata in
    `metadata_props`; returns the largest logit difference from the PyTorch model on `check_batch()`
    under onnxruntime, or None where onnxruntime is not installed (not checked)."""
    _require(ONNX_NEEDS, "ONNX export")
    import contextlib
    import inspect

    import torch

    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise CifarlabError(f"ONNX export needs torch's torch.export-based exporter (torch 2.5 or later); this is "
                            f"torch {torch.__version__}")
    target = Path(target)
    batch_axis = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")          # the exporter's own notes; the result is checked below
        program = torch.onnx.export(loaded.model.cpu(), (check_batch(2, seed=1),), input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch_axis},), dynamo=True,
                                    verbose=False)
    proto = program.model_proto
    proto.doc_string = (f"cifarlab {loaded.arch}: {INPUT_NAME} float32 NCHW [N, 3, {SIDE}, {SIDE}], RGB, 0..255 "
                        f"-> {OUTPUT_NAME} [N, {len(loaded.classes)}]; the metadata says the rest")
    del proto.metadata_props[:]
    for key, value in metadata(loaded).items():
        proto.metadata_props.add(key=key, value=value)
    with atomic_path(target) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        try:
            import onnxruntime
        except ImportError:
            return None
        batch = check_batch()
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
        return _agree("ONNX", target, got, reference_logits(loaded, batch))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exported file (ONNX or TorchScript, told apart by their content)."""
    path = Path(path)
    import zipfile

    if zipfile.is_zipfile(path):                 # TorchScript is a zip archive; ONNX a protobuf
        import torch

        extra = {TORCHSCRIPT_METADATA: ""}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        return json.loads(extra[TORCHSCRIPT_METADATA])
    _require(("onnx",), "reading ONNX metadata")
    import onnx

    return {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}


def export(onnx: Optional[str] = None, torchscript: Optional[str] = None, model: Optional[str] = None,
           exp: Optional[str] = None, repo: str = ".") -> list[str]:
    """Write the asked exports of one trained model; returns a line per file written."""
    if not (onnx or torchscript):
        raise CifarlabError("nothing to export: name --onnx PATH, --torchscript PATH or both")
    if onnx:
        _require(ONNX_NEEDS, "ONNX export")     # before loading anything
    loaded = load_model(model, exp, repo)
    lines = [f"model: {loaded.describe()}"]
    if torchscript:
        difference = export_torchscript(loaded, torchscript)
        lines.append(f"torchscript: {torchscript} (torch.jit.load; logits within {difference:.2g} of PyTorch's "
                     f"on {CHECK_BATCH} images)")
    if onnx:
        difference = export_onnx(loaded, onnx)
        checked = (f"onnxruntime: logits within {difference:.2g} of PyTorch's on {CHECK_BATCH} images"
                   if difference is not None else f"not checked: onnxruntime is not installed ({INSTALL})")
        lines.append(f"onnx: {onnx} ({checked})")
    lines.append("input: float32 NCHW [N, 3, 32, 32], RGB, pixel values 0..255 (normalisation inside); "
                 "docs/use-the-model.md")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifarlab export", description=__doc__.split("\n\n")[0],
                                     epilog="Input convention and how to load the files: docs/use-the-model.md")
    parser.add_argument("--onnx", metavar="PATH", help=f"write an ONNX model here (needs {INSTALL})")
    parser.add_argument("--torchscript", metavar="PATH", help="write a TorchScript model here (torch.jit.load)")
    model_arguments(parser)
    args = parser.parse_args(argv)
    return one_line(lambda: print("\n".join(export(args.onnx, args.torchscript, args.model, args.exp, args.repo))))


if __name__ == "__main__":
    sys.exit(main())
