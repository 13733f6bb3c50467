"""Every registered model against its seed write-up: parameter count, output, Grad-CAM layer,
dropout switch, and the printed model summary, layer for layer.

The seed tables (tests/data/seed_summaries/) are the write-ups' printed summaries, copied verbatim
(rows only) from the seed write-ups, so they can be diffed against the originals. Two formats occur:

* torchsummary (seeds 000-003): one row per module that ran, in the order each *finished* its
  forward; custom container modules (e.g. assignment 8's `ResBlock`) get a row after their
  children. Rows are numbered, which lets the parser prove no row went missing.
* torchinfo (seed 004, printed with depth 3): a tree in pre-order; a module at depth 3 with
  children (resnet18's conv shortcut) is one collapsed row holding its children's parameters,
  and container rows above that (`Sequential: 1-3`, `BasicBlock: 2-1`) are headers.

The model side is recorded with forward hooks on the leaf modules (with a depth limit: on the
modules at that depth, in place of their descendants), plus modules of any class a torchsummary
table prints as a container row. Rows compare on (type, output shape without the batch
dimension, parameter count).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cifarlab.models.names import model_names
from cifarlab.models.registry import cam_layer, create_model, model_spec
from conftest import REPO

# Total parameters each seed prints ("Total params"). A registered model missing here fails.
EXPECTED_PARAMS = {
    "custom_resnet": 6_573_130,      # seeds 002 and 003
    "a7_net": 467_098,               # seed 001
    "custom_resnet_a8": 6_575_370,   # seed 000
    "resnet18": 11_173_962,          # seed 004
    "fast_net": 1_972_792,           # not a seed: airbench94's network, counted by hand in its module doc
}

Row = tuple[str, tuple[int, ...], int]   # (module type, output shape without batch, params)


@dataclass(frozen=True)
class SeedTable:
    seed: str
    text: str                        # the printed rows, verbatim
    dropout: float = 0.0             # build the model with this (> 0 when the table has Dropout)
    depth: int | None = None         # torchinfo's depth limit, None for torchsummary
    containers: tuple[str, ...] = () # classes torchsummary printed as container rows

    def rows(self) -> list[Row]:
        return parse_torchinfo(self.text) if self.depth else parse_torchsummary(self.text)


_SHAPE = r"\[([\d, -]+)\]"
_TORCHSUMMARY_ROW = re.compile(rf"^\s*(\w+)-(\d+)\s+{_SHAPE}\s+([\d,]+)$")
_TORCHINFO_ROW = re.compile(
    rf"(\w+): (\d+)-\d+\s+{_SHAPE}\s+(?:{_SHAPE}|--)\s+{_SHAPE}\s+([\d,]+|--)\s+(?:True|False|--)$")


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(","))[1:]   # drop the batch dimension (-1 or 1)


def _count(text: str) -> int:
    return 0 if text == "--" else int(text.replace(",", ""))


def parse_torchsummary(text: str) -> list[Row]:
    lines = text.strip("\n").splitlines()
    matches = [_TORCHSUMMARY_ROW.match(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches) if not m]
    assert [int(m[2]) for m in matches] == list(range(1, len(lines) + 1)), "rows are not 1..n"
    return [(m[1], _shape(m[3]), _count(m[4])) for m in matches]


def parse_torchinfo(text: str) -> list[Row]:
    model_row, *lines = text.strip("\n").splitlines()   # the first row is the model itself
    assert not _TORCHINFO_ROW.search(model_row)
    matches = [_TORCHINFO_ROW.search(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches) if not m]
    depths = [int(m[2]) for m in matches] + [0]
    # A row followed by a deeper one is a header for its children: no row of its own to match.
    return [(m[1], _shape(m[5]), _count(m[6]))
            for i, m in enumerate(matches) if depths[i + 1] <= depths[i]]


def recorded_rows(model: nn.Module, x: torch.Tensor, depth: int | None = None,
                  containers: tuple[str, ...] = ()) -> list[Row]:
    """(type, output shape, params) of the summarised modules, in the order their forward ends."""
    rows: list[Row] = []

    def recorder(own_only: bool):
        def record(module: nn.Module, _inputs, output) -> None:
            params = sum(p.numel() for p in module.parameters(recurse=not own_only))
            rows.append((type(module).__name__, tuple(output.shape[1:]), params))
        return record

    handles = []
    for name, module in model.named_modules():
        if not name:
            continue                                   # the model itself has no row
        level = name.count(".") + 1
        is_leaf = next(module.children(), None) is None
        if depth is not None and level > depth:
            continue                                   # summarised by its depth-`depth` ancestor
        if is_leaf or level == depth:                  # a collapsed row holds all its parameters
            handles.append(module.register_forward_hook(recorder(own_only=False)))
        elif type(module).__name__ in containers:      # torchsummary: the container's own only
            handles.append(module.register_forward_hook(recorder(own_only=True)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def _input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_expected_params_table_matches_registry():
    assert set(EXPECTED_PARAMS) == set(model_names())


def test_every_module_that_registers_a_model_is_a_family():
    """A model module missing from FAMILIES would never be imported, so never registered: its name
    would be refused. Each family registers itself under its module's name when looked up."""
    from pathlib import Path

    from cifarlab.models import names as models

    registering = {path.stem for path in Path(models.__file__).parent.glob("*.py")
                   if "@register_model(" in path.read_text()}
    assert registering == set(models.FAMILIES)
    assert all(model_spec(name).name == name for name in models.FAMILIES)


def test_validating_params_imports_no_torch():
    """The download and max_lr stages load and check params (model.name included) without torch:
    they start in a fraction of a second."""
    import subprocess
    import sys

    code = ("import sys; from cifarlab.config.params import load_params; from cifarlab.pipeline import max_lr; from cifarlab.data import sources; "
            "load_params('params.yaml'); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("name", model_names())
def test_model_matches_seed_and_runs(name: str):
    assert name in EXPECTED_PARAMS, f"`{name}` has no seed parameter count in EXPECTED_PARAMS"
    torch.manual_seed(0)
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]

    cam = cam_layer(model, name)                      # resolves, and sees a 4-D activation
    seen: list[torch.Size] = []
    handle = cam.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    try:
        for train in (True, False):                   # BN with batch statistics, then running
            model.train(train)
            with torch.no_grad():
                out = model(_input())
            assert out.shape == (2, 10)
            assert torch.isfinite(out).all(), f"non-finite output (train={train})"
    finally:
        handle.remove()
    assert len(seen) == 2 and all(len(s) == 4 and s[0] == 2 for s in seen), \
        f"cam_layer `{model_spec(name).cam_layer}` saw {seen}"

    with torch.no_grad():
        assert create_model(name, num_classes=7).eval()(_input()).shape == (2, 7)


@pytest.mark.parametrize("name", model_names())
def test_dropout_argument_adds_dropout(name: str):
    def dropouts(m: nn.Module) -> list[nn.Dropout]:
        return [d for d in m.modules() if isinstance(d, nn.Dropout)]

    assert dropouts(create_model(name, dropout=0.0)) == []
    with_dropout = dropouts(create_model(name, dropout=0.2))
    assert with_dropout and all(d.p == 0.2 for d in with_dropout)


# Seed tables: the printed rows, verbatim (the header, totals and size lines left out), one file each in
# tests/data/seed_summaries/, named <seed>_<model>.txt.
SUMMARIES = Path(__file__).parent / "data" / "seed_summaries"


def _table(name: str) -> str:
    return (SUMMARIES / f"{name}.txt").read_text()


SEED_TABLES: list[tuple[str, SeedTable]] = [
    # 001_dea78ac8cdc61ff3.txt, assignment 7 (torchsummary). Dropout's p is not printed; any p > 0 puts the
    # Dropout rows in.
    ("a7_net", SeedTable("001", _table("001_a7_net"), dropout=0.1)),
    # 000_7d5530676d166a7a.txt, assignment 8 (torchsummary). ResBlock-14 and -29 are container rows.
    ("custom_resnet_a8", SeedTable("000", _table("000_custom_resnet_a8"), containers=("ResBlock",))),
    # 002_83aa6d7748cf0418.txt, assignment 10, long write-up (torchsummary, no dropout).
    ("custom_resnet", SeedTable("002", _table("002_custom_resnet"))),
    # 003_35b08997a8aa459e.txt, assignment 10, second write-up (torchsummary, dropout after blocks).
    ("custom_resnet", SeedTable("003", _table("003_custom_resnet"), dropout=0.1)),
    # 004_ca5c2c8e2cd39bc0.txt, session 11 (torchinfo, depth 3, input [1, 3, 32, 32]).
    ("resnet18", SeedTable("004", _table("004_resnet18"), depth=3)),
    # Not a seed: the fast preset's network as airbench94's paper describes it (Jordan 2024, arXiv:2404.00498,
    # figure 1), written out in torchsummary's format by hand.
    ("fast_net", SeedTable("paper", _table("paper_fast_net"))),
]


def test_every_model_has_a_seed_table():
    assert set(model_names()) <= {name for name, _ in SEED_TABLES}


@pytest.mark.parametrize("name,table", SEED_TABLES, ids=[f"{n}-{t.seed}" for n, t in SEED_TABLES])
def test_layers_match_seed_summary(name: str, table: SeedTable):
    expected = table.rows()
    assert sum(params for _, _, params in expected) == EXPECTED_PARAMS[name]   # table is whole
    model = create_model(name, dropout=table.dropout).eval()
    got = recorded_rows(model, _input(), table.depth, table.containers)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"row {i + 1}: model {g} != seed {e}"
    assert len(got) == len(expected)


def test_fast_net_whitening_layer_decorrelates_the_training_patches():
    """After `init_from_data` the frozen 2x2 whitening filters give the patches unit variance and
    no correlation (the first 12 channels; the other 12 are their negatives)."""
    from cifarlab.models.fast_net import WHITEN_EPS, FastNet

    torch.manual_seed(0)
    images = torch.randn(64, 3, 1, 1) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 0.3 * torch.randn(64, 3, 16, 16)
    images = images + torch.randn(64, 1, 16, 16)        # correlated channels, correlated neighbours
    model = FastNet()
    model.init_from_data(images)
    assert not model.whiten.weight.requires_grad
    out = torch.nn.functional.conv2d(images, model.whiten.weight)          # the layer without its bias
    flat = out.permute(0, 2, 3, 1).reshape(-1, 24).double()
    flat = flat - flat.mean(0)
    covariance = flat[:, :12].T @ flat[:, :12] / len(flat)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.double), atol=5 * WHITEN_EPS ** 0.5)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])


def test_build_model_initialises_a_data_dependent_network_from_the_training_images():
    from cifarlab.engine.classifier import Classifier, build_model
    from cifarlab.config.params import ModelParams
    from cifarlab.engine.runtime import Runtime
    from cifarlab.data.sources import make_synthetic

    runtime = Runtime(torch.device("cpu"), "fp32", False, 0)
    images = make_synthetic(200, 10, seed=0).train.images
    with pytest.raises(ValueError, match="fast_net initialises from training images"):
        build_model(ModelParams("fast_net", 0.0), runtime, 10)
    torch.manual_seed(0)
    model = build_model(ModelParams("fast_net", 0.0), runtime, 10, images)
    reference = Classifier("fast_net")
    reference.init_from_data(images)
    assert torch.equal(model.net.whiten.weight, reference.net.whiten.weight)
    assert not Classifier("a7_net").needs_data_init
