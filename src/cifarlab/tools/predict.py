"""Classify image files with a trained model: the workspace's models/model.pt, or any experiment's.

    python -m cifarlab predict cat.png photos/            # top 3 classes of each image
    python -m cifarlab predict --exp a10 --top 5 photos/  # experiment a10's model, read through DVC
    python -m cifarlab predict photos/ --csv out.csv --json out.json

An image is read with PIL (PNG, JPEG, or any format PIL reads; a folder gives its .png/.jpg/.jpeg
files, subfolders included), turned by its EXIF orientation, converted to RGB and resized to 32x32:
`--resize crop` (the default) scales the shorter side to 32 and keeps the centre square, `stretch`
scales the whole image to 32x32; both bilinear and antialiased. The model takes what training fed
it: float32 NCHW [N, 3, 32, 32], RGB, pixel values 0..255; its first layer normalises
(`INPUT_CONVENTION`; docs/use-the-model.md).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from cifarlab import paths
from cifarlab.atomic import atomic_path, write_json
from cifarlab.data.storage import CIFAR_MEAN, CIFAR_STD
from cifarlab.errors import CifarlabError

SIDE = 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")    # what a folder contributes; a file named on its own may be any format
RESIZE_MODES = ("crop", "stretch")

# What the model (and every export of it) takes and gives: the one statement of it, written into
# the exported files' metadata by `cifarlab.tools.export`.
INPUT_CONVENTION = {
    "input_layout": "NCHW",
    "input_shape": f"[N, 3, {SIDE}, {SIDE}]",
    "input_dtype": "float32",
    "input_range": "0..255 (8-bit pixel values as floats, not scaled to 0..1)",
    "channel_order": "RGB",
    "normalization": "inside the model, per channel: (x / 255 - mean) / std",
    "mean": list(CIFAR_MEAN),
    "std": list(CIFAR_STD),
    "resize": "any image to 32x32: shorter side to 32 then the centre square (predict --resize crop, the default), "
              "or the whole image to 32x32 (--resize stretch); bilinear, antialiased",
    "output": "logits [N, number of classes], in the order of `classes`; softmax gives probabilities",
}


@dataclass
class LoadedModel:
    model: "torch.nn.Module"   # noqa: F821 - eval mode, fp32, on `device`
    classes: tuple[str, ...]
    state: dict                # the checkpoint as saved: arch, epoch, data_source, params...
    source: str                # where it came from, for people: a path, or an experiment and its commit

    @property
    def arch(self) -> str:
        return self.state["arch"]

    def describe(self) -> str:
        return (f"{self.source}: {self.arch}, {len(self.classes)} classes, epoch {self.state.get('epoch', '?')}, "
                f"trained on {self.state.get('data_source', '?')} data")


# --- the model ------------------------------------------------------------------------------------

def experiment_commit(name: str, repo: str | Path = ".") -> tuple[str, str]:
    """(the commit, a label for people) of experiment `name`, resolved as `dvc exp` resolves names
    (DVC's `resolve_name`: a name shared by experiments of several baselines means the current
    commit's, else it is ambiguous; a full `refs/exps/...` ref is taken as it is); a name that is no
    experiment may be any git revision (commit, branch, tag), as DVC's `--rev` takes it."""
    from dvc.scm import SCM, SCMError

    try:
        scm = SCM(str(repo), search_parent_directories=True)
    except SCMError:
        raise CifarlabError(f"--exp {name}: {repo} is not in a git repository (experiments are git refs)") from None
    try:
        return _resolve(scm, name)
    finally:
        scm.close()


def _resolve(scm, name: str) -> tuple[str, str]:
    from dvc.repo.experiments.exceptions import AmbiguousExpRefInfo
    from dvc.repo.experiments.utils import exp_refs, resolve_name

    try:
        ref = resolve_name(scm, name).get(name)
    except AmbiguousExpRefInfo as err:
        refs = [line.strip() for line in str(err).splitlines()[2:] if line.strip()]
        raise CifarlabError(f"experiment name `{name}` is ambiguous (experiments of several commits, none of them "
                            f"the current one); give one of the full refs: {', '.join(refs)}") from None
    except Exception as err:   # noqa: BLE001 - a malformed refs/... name
        raise CifarlabError(f"--exp {name}: {' '.join(str(err).split())[:200]}") from None
    if ref is not None:
        commit = scm.get_ref(str(ref))
        return commit, f"experiment `{name}` (commit {commit[:7]})"
    try:
        commit = scm.resolve_rev(name)
    except Exception:   # noqa: BLE001 - scmrepo's RevError and friends
        known = sorted({info.name for info in exp_refs(scm)})
        listed = ", ".join(known[:30]) + (", ..." if len(known) > 30 else "") if known else "none"
        raise CifarlabError(f"unknown experiment `{name}` (nor a git revision); experiments here: {listed} "
                            f"(`dvc exp show` lists them)") from None
    return commit, f"revision `{name}` (commit {commit[:7]})"


def read_checkpoint_bytes(commit: str, label: str, repo: str | Path = ".") -> bytes:
    """models/model.pt as it was at `commit`, read through DVC (the git tree's dvc.lock, the DVC
    cache), without checking anything out."""
    import dvc.api

    try:
        with dvc.api.open(paths.CHECKPOINT.as_posix(), repo=str(repo), rev=commit, mode="rb") as handle:
            return handle.read()
    except Exception as err:   # noqa: BLE001 - DVC raises many types (missing path, missing cache, no repo)
        first = " ".join(str(err).split())[:200]
        raise CifarlabError(f"cannot read {paths.CHECKPOINT} of {label} through DVC ({type(err).__name__}: "
                            f"{first}); it must be in this repository's DVC cache (`dvc exp pull` / `dvc pull` "
                            f"bring it)") from None


def load_model(model: Optional[str | Path] = None, exp: Optional[str] = None, repo: str | Path = ".",
               device: str = "cpu") -> LoadedModel:
    """A trained model, ready to classify: the checkpoint at `model` (default models/model.pt), or the
    one of experiment `exp` in `repo`. Anything that is not a model of this library with a class list
    that fits its output is a CifarlabError."""
    import torch

    from cifarlab.engine.checkpoint import load_checkpoint

    if exp is not None:
        commit, label = experiment_commit(exp, repo)
        data = read_checkpoint_bytes(commit, label, repo)
        with tempfile.TemporaryDirectory(prefix="cifarlab-predict-") as folder:
            path = Path(folder) / paths.CHECKPOINT.name
            path.write_bytes(data)
            try:
                net, state = load_checkpoint(path)
            except CifarlabError as err:
                raise CifarlabError(str(err).replace(f"checkpoint {path}", f"{paths.CHECKPOINT} of {label}")) from None
        source = f"{paths.CHECKPOINT} of {label}"
    else:
        path = Path(model) if model is not None else paths.CHECKPOINT
        net, state = load_checkpoint(path)
        source = str(path)
    net = net.to(device).float().eval().requires_grad_(False)
    with torch.no_grad():
        outputs = net(torch.zeros(1, 3, SIDE, SIDE, device=device)).shape[-1]
    classes = state.get("classes")
    if not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes)):
        raise CifarlabError(f"{source} has no usable class list (`classes`: {str(classes)[:80]}); allowed: "
                            f"{outputs} distinct class names, as `dvc repro train` saves them")
    if len(classes) != outputs:
        raise CifarlabError(f"{source} lists {len(classes)} classes ({', '.join(classes)[:80]}) but its "
                            f"`{state['arch']}` outputs {outputs} logits: the weights are not of this class list")
    return LoadedModel(net, tuple(classes), state, source)


# --- the images -----------------------------------------------------------------------------------

def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The files to classify: each file as given, each folder's IMAGE_SUFFIXES files (subfolders
    included, sorted), each once."""
    if not inputs:
        raise CifarlabError("no images given; name image files or folders")
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
            if not files:
                raise CifarlabError(f"folder {item} has no {'/'.join(IMAGE_SUFFIXES)} files")
            found.extend(files)
        elif item.is_file():
            found.append(item)
        else:
            raise CifarlabError(f"{item} does not exist (allowed: image files and folders of them)")
    return list(dict.fromkeys(found))


def load_image(path: str | Path, resize: str = "crop") -> np.ndarray:
    """One image file as the model's input: uint8 [32, 32, 3], RGB (see the module doc)."""
    from PIL import Image, ImageOps

    if resize not in RESIZE_MODES:
        raise CifarlabError(f"--resize {resize!r}: allowed: {', '.join(RESIZE_MODES)}")
    try:
        with Image.open(path) as image:
            image.draft("RGB", (SIDE, SIDE))          # JPEG: decode at the smallest scale that still covers 32x32
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CifarlabError(f"{path} is not an image PIL can read ({' '.join(str(err).split())[:120]}); "
                            f"allowed: PNG, JPEG or another format PIL reads") from None
    width, height = image.size
    if resize == "crop" and width != height:
        scale = SIDE / min(width, height)
        size = (max(SIDE, round(width * scale)), max(SIDE, round(height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        left, top = (size[0] - SIDE) // 2, (size[1] - SIDE) // 2
        image = image.crop((left, top, left + SIDE, top + SIDE))
    elif image.size != (SIDE, SIDE):
        image = image.resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def to_input(images: np.ndarray) -> "torch.Tensor":   # noqa: F821
    """uint8 HWC images [N, 32, 32, 3] -> the model's input: float32 NCHW, pixel values 0..255."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


def probabilities(loaded: LoadedModel, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Softmax of the model's logits (fp32) for uint8 HWC images: [N, number of classes]."""
    import torch

    device = next(loaded.model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = loaded.model(to_input(images[start:start + batch_size]).to(device))
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(loaded.classes)), dtype=np.float32)


def top_k(probs: np.ndarray, classes: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(classes[j], float(row[j])) for j in picks] for row, picks in zip(probs, order)]


# --- the command ----------------------------------------------------------------------------------

def write_csv(target: str | Path, files: Sequence[Path], tops: list[list[tuple[str, float]]]) -> None:
    k = len(tops[0]) if tops else 0
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", *[f"{what}_{rank}" for rank in range(1, k + 1) for what in ("class", "probability")]])
    for file, top in zip(files, tops):
        writer.writerow([str(file), *[value for name, p in top for value in (name, repr(p))]])
    with atomic_path(target) as tmp:
        tmp.write_text(buffer.getvalue())


def predict_files(inputs: Sequence[str | Path], model: Optional[str] = None, exp: Optional[str] = None,
                  repo: str = ".", top: int = 3, resize: str = "crop", device: str = "cpu",
                  csv_path: Optional[str] = None, json_path: Optional[str] = None) -> tuple[LoadedModel, dict]:
    """Classify the images of `inputs` (see `find_images`); write CSV/JSON where asked. Returns the
    model and what the JSON holds: the model, the preprocessing and each file's top classes."""
    if resize not in RESIZE_MODES:
        raise CifarlabError(f"--resize {resize!r}: allowed: {', '.join(RESIZE_MODES)}")
    files = find_images(inputs)
    loaded = load_model(model, exp, repo, device)
    if not 1 <= top <= len(loaded.classes):
        raise CifarlabError(f"--top {top}: allowed: 1..{len(loaded.classes)} (the model's classes)")
    images = np.stack([load_image(file, resize) for file in files])
    tops = top_k(probabilities(loaded, images), loaded.classes, top)
    result = {"model": {"source": loaded.source, "arch": loaded.arch, "epoch": loaded.state.get("epoch"),
                        "data_source": loaded.state.get("data_source"), "classes": list(loaded.classes)},
              "preprocessing": {**INPUT_CONVENTION, "resize": resize},
              "predictions": [{"file": str(file), "top": [{"class": name, "probability": p} for name, p in ranked]}
                              for file, ranked in zip(files, tops)]}
    if csv_path:
        write_csv(csv_path, files, tops)
    if json_path:
        write_json(json_path, result)
    return loaded, result


def one_line(work: Callable[[], None]) -> int:
    """Run a tool's work: a CifarlabError, an unreadable/unwritable file or Ctrl-C is one line on
    stderr and exit status 1 (130 for Ctrl-C), as a stage reports it; anything else is a bug."""
    try:
        work()
    except CifarlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except OSError as err:
        if err.filename is None:
            raise
        print(f"error: cannot access {err.filename}: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --exp / --repo: which trained model (shared with `python -m cifarlab export`)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="PATH", help=f"a checkpoint file (default: {paths.CHECKPOINT})")
    which.add_argument("--exp", metavar="NAME", help=f"the {paths.CHECKPOINT} of this experiment (a name "
                       "`dvc exp show` lists, or any git revision), read through DVC without applying it")
    parser.add_argument("--repo", default=".", help="the DVC repository --exp reads (default: the current directory)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifarlab predict", description=__doc__.split("\n\n")[0],
                                     epilog="Input convention and exports: docs/use-the-model.md")
    parser.add_argument("images", nargs="+", help="image files and folders (a folder: its .png/.jpg/.jpeg files)")
    model_arguments(parser)
    parser.add_argument("--top", type=int, default=3, metavar="K", help="classes shown per image (default: 3)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                        help="crop: shorter side to 32, centre square (default); stretch: the whole image to 32x32")
    parser.add_argument("--device", default="cpu", help="torch device to run on, e.g. cuda (default: cpu; fp32)")
    parser.add_argument("--csv", metavar="PATH", help="also write file, class_1, probability_1, ... here")
    parser.add_argument("--json", metavar="PATH", help="also write the model, preprocessing and predictions here")
    args = parser.parse_args(argv)

    def work() -> None:
        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise CifarlabError(f"--device {args.device}: no CUDA device here; allowed: cpu")
        loaded, result = predict_files(args.images, args.model, args.exp, args.repo, args.top, args.resize,
                                       args.device, args.csv, args.json)
        print(f"model: {loaded.describe()}")
        for item in result["predictions"]:
            print(f"{item['file']}: " + ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in item["top"]))
        for what, path in (("csv", args.csv), ("json", args.json)):
            if path:
                print(f"{what}: {path}")

    return one_line(work)


if __name__ == "__main__":
    sys.exit(main())
