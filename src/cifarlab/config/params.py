"""params.yaml, loaded once into frozen typed sections.

Every key is declared here with its type and allowed values (the value checks are in `checks.py`).
Loading rejects unknown keys (with a did-you-mean suggestion), wrong types and out-of-range values
with one line that names the key, so a typo such as `train.max_lrr` stops a stage instead of being
silently ignored.

params.yaml is parsed exactly as DVC parses it (`dvc.utils.serialize.parse_yaml`: ruamel.yaml,
`typ="safe"`, YAML 1.2), so `1e-3` is the float 0.001 (PyYAML's YAML 1.1 would read the string
'1e-3'), `yes` is a string, and a key given twice in one mapping is refused, as DVC refuses it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import YAMLError

from cifarlab.config import lr_rules
from cifarlab.config.checks import FIND  # noqa: F401  (re-exported: train.max_lr's word, imported with the sections)
from cifarlab.config.checks import (any_int, auto_or, boolean, device_name, float_at_least, fraction_below_one,
                                    host_port, int_at_least, int_from_to, key, lr_or_find, md5_hex, model_name,
                                    non_negative_int, null_or, one_of, positive_float, positive_int, probability, text)
from cifarlab.errors import CifarlabError
from cifarlab.models.names import WHITENING


class ParamsError(CifarlabError):
    """params.yaml is unreadable or a key is unknown, mistyped or out of range."""


IMAGE_SIDE = 32     # CIFAR-10 and the synthetic set: 32 x 32 pixel images (the data files are checked for it)


# --- sections -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataParams:
    source: str = key(one_of("cifar10", "synthetic"))
    url: str = key(text)
    md5: str = key(md5_hex)
    synthetic_train_size: int = key(positive_int)
    synthetic_test_size: int = key(positive_int)
    synthetic_seed: int = key(any_int)
    train_subset: int = key(non_negative_int)
    test_subset: int = key(non_negative_int)


@dataclass(frozen=True)
class ModelParams:
    name: str = key(model_name)
    dropout: float = key(fraction_below_one)


@dataclass(frozen=True)
class AugmentParams:
    pad: int = key(non_negative_int)
    pad_mode: str = key(one_of("reflect", "constant"))
    hflip: float = key(probability)
    cutout_size: int = key(non_negative_int)
    cutout_p: float = key(probability)
    path: str = key(one_of("per_image", "batch", "auto"))
    alternate_flip: bool = key(boolean)

    # Which steps these params switch on: `augment.build_train_transform` builds exactly these.
    @property
    def crops(self) -> bool:
        return self.pad > 0

    @property
    def flips(self) -> bool:
        return self.hflip > 0

    @property
    def cuts_out(self) -> bool:
        return self.cutout_size > 0 and self.cutout_p > 0

    def steps(self) -> list[str]:
        """The per-image steps, in the order they are applied, in words; empty: no augmentation."""
        steps = []
        if self.crops:
            steps.append(f"pad {self.pad} ({self.pad_mode}) + random {IMAGE_SIDE}x{IMAGE_SIDE} crop")
        if self.flips and self.alternate_flip:
            steps.append("horizontal flip of each image in every other epoch (alternate_flip)")
        elif self.flips:
            steps.append(f"horizontal flip (p {self.hflip:g})")
        if self.cuts_out:
            steps.append(f"{self.cutout_size}x{self.cutout_size} cutout (p {self.cutout_p:g})")
        return steps

    def switched_off(self) -> str:
        """The values that switch every step off (meaningful when `steps()` is empty)."""
        cutout = (f"augment.cutout_size {self.cutout_size}" if self.cutout_size == 0
                  else f"augment.cutout_p {self.cutout_p:g}")
        return f"augment.pad {self.pad}, augment.hflip {self.hflip:g}, {cutout}"

    def describe(self) -> str:
        """The steps in one line, or "none" with the values that switch them off."""
        return ", then ".join(self.steps()) if self.steps() else f"none ({self.switched_off()})"


@dataclass(frozen=True)
class OptimParams:
    name: str = key(one_of("adam", "adamw", "sgd", "muon"))
    weight_decay: float = key(float_at_least(0.0))
    momentum: float = key(fraction_below_one)
    nesterov: bool = key(boolean)
    label_smoothing: float = key(fraction_below_one)
    bias_lr_scale: float = key(float_at_least(1.0))
    lookahead: bool = key(boolean)
    whiten_bias_epochs: Optional[int] = key(null_or(positive_int, "a whole number >= 1"))
    # muon only (cifarlab.engine.muon): the conv filters' Muon, and the SGD side's LR as a multiple of Muon's
    muon_momentum: float = key(fraction_below_one)
    muon_ns_steps: int = key(int_from_to(1, 99, " (torch.optim.Muon refuses 100 or more)"))
    muon_renormalise: bool = key(boolean)
    muon_sgd_lr_scale: float = key(positive_float)


LR_FIND_WHEN = ("find", "always")   # lr_find.when: run the range test only for train.max_lr `find`, or always


@dataclass(frozen=True)
class LrFindParams:
    when: str = key(one_of(*LR_FIND_WHEN))
    start_lr: float = key(positive_float)
    end_lr: float = key(positive_float)
    num_iter: int = key(int_at_least(lr_rules.MIN_NUM_ITER, f" (the rules skip the first {lr_rules.SKIP_START} "
                                                             f"points and need {lr_rules.MIN_WINDOW} below the minimum)"))
    step_mode: str = key(one_of("exp", "linear"))
    smooth_f: float = key(fraction_below_one)
    stop_rebound: float = key(positive_float)
    rule: str = key(one_of(*lr_rules.RULES))


@dataclass(frozen=True)
class TrainParams:
    epochs: int = key(positive_int)
    batch_size: int = key(positive_int)
    max_lr: Union[float, str] = key(lr_or_find)
    max_at_epoch: int = key(positive_int)
    div_factor: float = key(float_at_least(1.0))
    final_div_factor: float = key(float_at_least(1.0))
    three_phase: bool = key(boolean)
    anneal_strategy: str = key(one_of("linear", "cos"))
    cycle_momentum: bool = key(boolean)
    seed: int = key(any_int)
    diverge_factor: float = key(float_at_least(1.0))
    drop_last: bool = key(boolean)


# The test-time augmentations by their `evaluate.*` switch (also their key in the metrics files), with
# the name the report gives them; engine.metrics.TTA_VARIANTS holds the modules that compute them.
TTA_LABELS = {"tta_hflip": "horizontal-flip TTA", "tta_translate": "flip + translate TTA (6 views)"}


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = key(positive_int)
    gallery_size: int = key(non_negative_int)
    gradcam_size: int = key(non_negative_int)
    tta_hflip: bool = key(boolean)
    tta_translate: bool = key(boolean)


@dataclass(frozen=True)
class ReportParams:
    preset: str = key(text)
    target_accuracy: float = key(probability)
    writeup_accuracy: Optional[float] = key(null_or(probability, "a number from 0 to 1"))
    title: str = key(text)


@dataclass(frozen=True)
class RuntimeParams:
    device: str = key(device_name)
    precision: str = key(one_of("auto", "fp32", "bf16", "fp16"))
    channels_last: Union[bool, str] = key(auto_or(boolean, "true or false"))
    num_workers: Union[int, str] = key(auto_or(non_negative_int, "a whole number >= 0"))
    threads: Union[int, str] = key(auto_or(positive_int, "a whole number >= 1"))
    nproc: int = key(positive_int)
    nnodes: int = key(positive_int)
    rdzv_endpoint: Optional[str] = key(null_or(host_port, "HOST:PORT, e.g. node0:29400"))
    deterministic: bool = key(boolean)
    compile: bool = key(boolean)


@dataclass(frozen=True)
class BudgetParams:
    name: str = key(text)   # recorded, not read: the budget's effects are the keys its file sets


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: ModelParams
    augment: AugmentParams
    optim: OptimParams
    lr_find: LrFindParams
    train: TrainParams
    evaluate: EvaluateParams
    report: ReportParams
    runtime: RuntimeParams
    budget: BudgetParams

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- loading ------------------------------------------------------------------------------------

def _unknown_key(name: str, allowed: list[str]) -> ParamsError:
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], allowed, n=1)
    hint = f" (did you mean `{name.rsplit('.', 1)[0] + '.' if '.' in name else ''}{close[0]}`?)" if close else ""
    return ParamsError(f"unknown params key `{name}`{hint}; allowed: {', '.join(allowed)}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(raw, dict):
        raise ParamsError(f"params `{prefix}` must be a mapping of keys {', '.join(fields)}")
    for name in raw:
        if name not in fields:
            raise _unknown_key(f"{prefix}.{name}" if prefix else str(name), list(fields))
    values = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            raise ParamsError(f"params key `{dotted}` is missing")
        if raw[name] == "???":
            raise ParamsError(f"params key `{dotted}` has no value (`???`): it is part of an assignment's recipe, "
                              f"which every preset sets; set it in conf/preset/<name>.yaml or with -S {dotted}=...")
        if "check" in f.metadata:
            try:
                values[name] = f.metadata["check"](raw[name])
            except ValueError as err:
                raise ParamsError(f"params key `{dotted}` is {raw[name]!r}; allowed: {err}") from None
        else:  # a nested section
            values[name] = _build(f.type if isinstance(f.type, type) else globals()[f.type], raw[name], dotted)
    return cls(**values)


def _check_across_sections(params: Params) -> None:
    train = params.train
    if not 1 <= train.max_at_epoch <= train.epochs:
        raise ParamsError(
            f"params key `train.max_at_epoch` is {train.max_at_epoch}; allowed: 1..train.epochs ({train.epochs})")
    if params.lr_find.end_lr <= params.lr_find.start_lr:
        raise ParamsError(
            f"params key `lr_find.end_lr` is {params.lr_find.end_lr:g}; allowed: a number > lr_find.start_lr "
            f"({params.lr_find.start_lr:g})")
    for name in ("pad", "cutout_size"):
        value = getattr(params.augment, name)
        if value > IMAGE_SIDE:
            raise ParamsError(f"params key `augment.{name}` is {value}; allowed: 0..{IMAGE_SIDE} "
                              f"(at most the image side, {IMAGE_SIDE} pixels)")
    if params.augment.alternate_flip and params.augment.path == "per_image":
        raise ParamsError("params key `augment.alternate_flip` is true; allowed only with augment.path batch or auto "
                          "(the per-image path flips at random)")
    if params.optim.whiten_bias_epochs is not None:
        if params.model.name not in WHITENING:
            raise ParamsError(f"params key `optim.whiten_bias_epochs` is {params.optim.whiten_bias_epochs}; allowed: "
                              f"null for model {params.model.name} (only a model with a whitening conv, e.g. "
                              f"fast_net, has that bias)")
    if params.optim.name == "muon" and train.cycle_momentum:
        raise ParamsError("params key `train.cycle_momentum` is true; allowed with optim.name muon: false (its two "
                          "momenta, optim.muon_momentum and optim.momentum, stay as set)")
    runtime = params.runtime
    if ":" in runtime.device and runtime.nproc > 1:
        raise ParamsError(f"params key `runtime.device` is {runtime.device}; allowed with runtime.nproc "
                          f"{runtime.nproc}: auto or cuda (a DDP run takes {runtime.nproc} free GPUs)")
    if runtime.nnodes > 1 and runtime.rdzv_endpoint is None:
        raise ParamsError(f"params key `runtime.rdzv_endpoint` is null; allowed with runtime.nnodes {runtime.nnodes}: "
                          f"HOST:PORT of one of the machines, the same on every machine, e.g. node0:29400")
    data = params.data
    if data.source == "synthetic":
        for split in ("train", "test"):
            subset, size = getattr(data, f"{split}_subset"), getattr(data, f"synthetic_{split}_size")
            if subset > size:
                raise ParamsError(f"params key `data.{split}_subset` is {subset}; allowed: 0 (the whole split) or "
                                  f"at most data.synthetic_{split}_size ({size})")
    if data.train_subset and train.batch_size > data.train_subset:
        raise ParamsError(
            f"params key `train.batch_size` is {train.batch_size}; allowed: at most the training images used "
            f"(data.train_subset = {data.train_subset})")
    if data.source == "synthetic" and train.batch_size > data.synthetic_train_size:
        raise ParamsError(
            f"params key `train.batch_size` is {train.batch_size}; allowed: at most the training split size "
            f"(data.synthetic_train_size = {data.synthetic_train_size})")


def parse_params(raw: Any) -> Params:
    """Validate an already-parsed params mapping."""
    params = _build(Params, raw, "")
    _check_across_sections(params)
    return params


def read_yaml(path: str | Path) -> Any:
    """A YAML file read exactly as DVC reads params.yaml and dvc.yaml (ruamel.yaml, safe, YAML 1.2;
    duplicate keys refused); any problem is a one-line ParamsError naming the file and line."""
    path = Path(path)
    try:
        text_ = path.read_text()
    except OSError as err:
        raise ParamsError(f"cannot read {path}: {err.strerror}") from None
    try:
        return YAML(typ="safe").load(text_)
    except DuplicateKeyError as err:
        found = re.search(r'found duplicate key "(.*?)"', str(err.problem))
        where = err.problem_mark.line + 1 if err.problem_mark is not None else "?"
        raise ParamsError(f"{path} line {where}: the key `{found.group(1) if found else '?'}` appears twice in the "
                          f"same mapping; allowed: each key once (DVC refuses duplicate keys)") from None
    except YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[-1]
        raise ParamsError(f"{path} is not valid YAML{line}: {problem}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; any problem is a ParamsError naming the key."""
    return parse_params(read_yaml(path))


def apply_overrides(raw: Any, overrides: Iterable[str], option: str = "--set") -> Any:
    """A copy of the params mapping `raw` with `section.key=value` overrides applied, for tools that
    take them on the command line (bench/throughput.py's `--set`).

    Each value is read as params.yaml's values are (YAML 1.2, so `1e-3` is a number and `find` a
    string); the key must already exist. A malformed override or an unknown key is a one-line
    ParamsError naming it; a value of the wrong type or range is caught by `parse_params` afterwards,
    naming the key as for params.yaml itself.
    """
    out = copy.deepcopy(raw)
    if not isinstance(out, dict):
        raise ParamsError("params must be a mapping of sections")
    for override in overrides:
        dotted, sep, value = override.partition("=")
        parts = dotted.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ParamsError(f"{option} {override!r}: expected section.key=value, e.g. train.max_lr=0.003")
        section, name = parts
        if not isinstance(out.get(section), dict):
            raise _unknown_key(section, list(out))
        if name not in out[section]:
            raise _unknown_key(f"{section}.{name}", list(out[section]))
        try:
            out[section][name] = YAML(typ="safe").load(value)
        except YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).strip().splitlines()[-1]
            raise ParamsError(f"{option} {section}.{name}={value}: the value is not valid YAML ({problem})") from None
    return out
