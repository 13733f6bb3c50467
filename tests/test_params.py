import dataclasses

import pytest
import yaml

from cifarlab.config.params import apply_overrides, ParamsError, load_params, parse_params
from conftest import REPO, merge


def test_committed_params_are_assignment_10():
    params = load_params(REPO / "params.yaml")
    assert params.model.name == "custom_resnet"
    assert params.optim.name == "adam"
    assert (params.train.batch_size, params.train.epochs, params.train.max_at_epoch) == (512, 24, 5)
    assert params.train.final_div_factor == 1.0          # no annihilation
    assert (params.augment.pad, params.augment.hflip, params.augment.cutout_size) == (4, 0.5, 8)
    assert params.report.target_accuracy == 0.90
    assert params.data.source == "cifar10"


def test_params_are_frozen(default_params):
    params = parse_params(default_params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.epochs = 3


def message(raw) -> str:
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    text = str(err.value)
    assert "\n" not in text
    return text


def test_unknown_key_names_it_and_suggests(default_params):
    raw = merge(default_params, {"train": {"max_lrr": 0.1}})
    text = message(raw)
    assert "`train.max_lrr`" in text and "did you mean `train.max_lr`" in text


def test_unknown_section(default_params):
    assert "`trian`" in message({**default_params, "trian": {}})


@pytest.mark.parametrize("section,key,value,allowed", [
    ("train", "epochs", "ten", "whole number"),
    ("train", "epochs", 0, "whole number >= 1"),
    ("train", "batch_size", -4, "whole number >= 1"),
    ("train", "epochs", 2.5, "whole number"),
    ("train", "max_lr", -0.1, "`find`"),
    ("train", "max_lr", "fnd", "`find`"),
    ("train", "div_factor", 0.5, ">= 1"),
    ("train", "anneal_strategy", "cosine", "linear, cos"),
    ("optim", "name", "rmsprop", "adam, adamw, sgd"),
    ("optim", "label_smoothing", 1.0, "< 1"),
    ("augment", "hflip", 1.5, "0 to 1"),
    ("data", "source", "imagenet", "cifar10, synthetic"),
    ("data", "md5", "abc", "hexadecimal"),
    ("data", "synthetic_train_size", 0, ">= 1"),
    ("data", "train_subset", -1, "whole number >= 0"),
    ("data", "train_subset", 0.5, "whole number >= 0"),
    ("data", "test_subset", "all", "whole number >= 0"),
    ("data", "test_subset", True, "whole number >= 0"),
    ("model", "name", "resnet1000", "custom_resnet"),
    ("runtime", "device", "tpu", "auto, cpu, cuda"),
    ("runtime", "num_workers", -1, "auto or"),
    ("lr_find", "rule", "minimum", "min_div_10, steepest, valley"),
    ("report", "writeup_accuracy", 92.64, "null or a number from 0 to 1"),
    ("report", "writeup_accuracy", "92%", "null or a number from 0 to 1"),
])
def test_bad_value_names_key_and_allowed(default_params, section, key, value, allowed):
    text = message(merge(default_params, {section: {key: value}}))
    assert f"`{section}.{key}`" in text and allowed in text


def test_max_at_epoch_must_be_within_epochs(default_params):
    text = message(merge(default_params, {"train": {"max_at_epoch": 25}}))
    assert "`train.max_at_epoch`" in text and "1..train.epochs (24)" in text


def test_batch_larger_than_synthetic_training_set(default_params):
    raw = merge(default_params, {"data": {"source": "synthetic", "synthetic_train_size": 100}})
    assert "`train.batch_size`" in message(raw)


def test_subsets_default_to_the_whole_splits(default_params):
    data = parse_params(default_params).data
    assert (data.train_subset, data.test_subset) == (0, 0)
    assert parse_params(merge(default_params, {"data": {"train_subset": 1000, "test_subset": 200}})).data.test_subset == 200


@pytest.mark.parametrize("split,size", [("train", 5000), ("test", 1000)])
def test_subset_larger_than_the_synthetic_split(default_params, split, size):
    synthetic = {"source": "synthetic", "train_subset": 0, "test_subset": 0}
    raw = merge(default_params, {"data": {**synthetic, f"{split}_subset": size + 1}})
    assert message(raw) == (f"params key `data.{split}_subset` is {size + 1}; allowed: 0 (the whole split) or at most "
                            f"data.synthetic_{split}_size ({size})")
    assert getattr(parse_params(merge(default_params, {"data": {**synthetic, f"{split}_subset": size}})).data,
                   f"{split}_subset") == size


def test_batch_larger_than_the_training_subset(default_params):
    raw = merge(default_params, {"data": {"train_subset": 100}})            # cifar10 source: no other bound known here
    text = message(raw)
    assert "`train.batch_size` is 512" in text and "data.train_subset = 100" in text


def test_missing_key(default_params):
    del default_params["train"]["seed"]
    assert "`train.seed` is missing" in message(default_params)


def test_writeup_accuracy_may_be_null(default_params):
    # a write-up that states no accuracy: null in its preset, and the report says so
    assert parse_params(merge(default_params, {"report": {"writeup_accuracy": None}})).report.writeup_accuracy is None
    assert parse_params(default_params).report.writeup_accuracy == 0.9264


def test_max_lr_find_is_accepted(default_params):
    assert parse_params(merge(default_params, {"train": {"max_lr": "find"}})).train.max_lr == "find"


def test_invalid_yaml_is_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(ParamsError, match=r"not valid YAML at line \d+") as err:
        load_params(bad)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(tmp_path / "nope.yaml")


def test_round_trip_through_yaml(default_params, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(default_params))
    assert load_params(path).to_dict() == parse_params(default_params).to_dict()


# --- read exactly as DVC reads params.yaml (ruamel.yaml, YAML 1.2), image-side limits ---------------

def test_unquoted_exponent_is_a_float_as_dvc_reads_it(default_params, tmp_path):
    from dvc.utils.serialize import parse_yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(default_params).replace("max_lr: 0.0017", "max_lr: 1e-3"))
    assert "max_lr: 1e-3" in path.read_text()
    assert load_params(path).train.max_lr == 0.001
    assert parse_yaml(path.read_text(), str(path))["train"]["max_lr"] == 0.001     # DVC's own reading


def test_duplicate_key_is_refused_like_dvc(default_params, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(default_params).replace("  epochs: 24\n", "  epochs: 24\n  epochs: 3\n", 1))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    text = str(err.value)
    assert "\n" not in text and "the key `epochs` appears twice" in text and "DVC refuses duplicate keys" in text


@pytest.mark.parametrize("key,value", [("cutout_size", 64), ("cutout_size", 33), ("pad", 40)])
def test_augment_sizes_above_the_image_side_are_refused(default_params, key, value):
    text = message(merge(default_params, {"augment": {key: value}}))
    assert f"`augment.{key}` is {value}; allowed: 0..32" in text


@pytest.mark.parametrize("key", ["cutout_size", "pad"])
def test_augment_sizes_up_to_the_image_side_are_accepted(default_params, key):
    assert getattr(parse_params(merge(default_params, {"augment": {key: 32}})).augment, key) == 32


# --- command-line overrides (bench/throughput.py --set) -----------------------------------------

def test_overrides_are_read_as_params_yaml_values(default_params):
    raw = apply_overrides(default_params, ["train.max_lr=1e-3", "runtime.channels_last=false",
                                           "runtime.num_workers=0", "train.max_lr=find", "model.name=a7_net"])
    params = parse_params(raw)
    assert (params.train.max_lr, params.runtime.channels_last, params.runtime.num_workers) == ("find", False, 0)
    assert params.model.name == "a7_net"
    assert parse_params(apply_overrides(default_params, ["train.max_lr=1e-3"])).train.max_lr == 0.001   # YAML 1.2
    assert default_params["model"]["name"] != "a7_net"            # the input is not modified


@pytest.mark.parametrize("override,message", [
    ("train.max_lrr=0.1", "unknown params key `train.max_lrr` (did you mean `train.max_lr`?); allowed: epochs"),
    ("trian.epochs=3", "unknown params key `trian` (did you mean `train`?); allowed: data, model"),
    ("train.max_lr", "--set 'train.max_lr': expected section.key=value"),
    ("max_lr=0.1", "--set 'max_lr=0.1': expected section.key=value"),
    ("train.max_lr.x=1", "expected section.key=value"),
    ("train.epochs=[1", "--set train.epochs=[1: the value is not valid YAML"),
])
def test_bad_override_is_one_line_naming_it(default_params, override, message):
    with pytest.raises(ParamsError) as error:
        apply_overrides(default_params, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_override_of_the_wrong_type_fails_naming_the_key(default_params):
    with pytest.raises(ParamsError, match=r"params key `train.epochs` is 'three'; allowed: a whole number >= 1"):
        parse_params(apply_overrides(default_params, ["train.epochs=three"]))
