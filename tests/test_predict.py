"""`python -m cifarlab predict` on the tiny run's trained model (conftest.tiny_run) and on named
experiments (conftest.preset_runs): real PNG and JPEG files of odd sizes, folders, CSV/JSON, and
every bad input as one line."""

from __future__ import annotations

import csv
import functools
import json
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.engine.checkpoint import load_checkpoint, save_checkpoint
from cifarlab.errors import CifarlabError
from cifarlab.tools.predict import find_images, load_image, load_model, main, predict_files
from conftest import copy_repo

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def model_path(tiny_run):
    return tiny_run / "models" / "model.pt"


@pytest.fixture(scope="module")
def test_split(tiny_run):
    with np.load(tiny_run / "data" / "test.npz") as data:
        return data["images"], data["labels"]


def save(path, pixels, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path, **options)
    return path


def noise(height, width, seed=0, channels=3):
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_test_images_written_as_png_are_classified_as_evaluate_classified_them(tmp_path, model_path, tiny_run,
                                                                                 test_split):
    """The images evaluate saw, as 32x32 PNG files: read back bit for bit, and classified as the
    evaluate stage classified them (plots/confusion.csv, in test-split order) wherever the fp32 top
    two are clearly apart (evaluate may have run in bf16)."""
    images, _ = test_split
    count = 40
    files = [save(tmp_path / f"test-{i:03d}.png", images[i]) for i in range(count)]
    assert all(np.array_equal(load_image(f), images[i]) for i, f in enumerate(files))

    loaded, result = predict_files(files, model=model_path, top=10)
    classes = list(loaded.classes)
    probs = np.array([[dict((t["class"], t["probability"]) for t in p["top"])[c] for c in classes]
                      for p in result["predictions"]])
    model, _ = load_checkpoint(model_path)
    with torch.no_grad():   # the convention stated independently: uint8-range float NCHW, RGB
        want = torch.softmax(model.eval()(torch.tensor(images[:count]).permute(0, 3, 1, 2).float()), 1).numpy()
    np.testing.assert_allclose(probs, want, atol=1e-5)

    with open(tiny_run / "plots" / "confusion.csv") as handle:
        evaluated = [row["predicted"] for row in csv.DictReader(handle)]
    assert len(evaluated) == len(images)
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = [i for i in range(count) if top2[i, 1] - top2[i, 0] > 0.05]
    assert len(clear) >= count // 2
    assert [result["predictions"][i]["top"][0]["class"] for i in clear] == [evaluated[i] for i in clear]


def test_png_and_jpeg_of_odd_sizes_and_modes(tmp_path, model_path):
    files = [save(tmp_path / "wide.png", noise(37, 53)), save(tmp_path / "tall.jpg", noise(120, 77, 1), quality=85),
             save(tmp_path / "gray.jpeg", noise(17, 9, 2, channels=1)),
             save(tmp_path / "rgba.png", noise(31, 33, 3, channels=4)),
             save(tmp_path / "tiny.png", noise(1, 3, 4))]
    Image.open(files[0]).convert("P").save(tmp_path / "palette.png")
    files.append(tmp_path / "palette.png")
    for file in files:
        pixels = load_image(file)
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    loaded, result = predict_files(files, model=model_path, top=3)
    assert [p["file"] for p in result["predictions"]] == [str(f) for f in files]
    for prediction in result["predictions"]:
        probs = [t["probability"] for t in prediction["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(t["class"] in loaded.classes for t in prediction["top"])


def test_crop_keeps_the_centre_square_and_stretch_the_whole_image(tmp_path):
    banded = np.zeros((64, 96, 3), dtype=np.uint8)
    banded[:] = BLUE
    banded[:, :8] = banded[:, -8:] = RED            # outside the centre 64x64
    path = save(tmp_path / "banded.png", banded)
    cropped, stretched = load_image(path, "crop"), load_image(path, "stretch")
    assert (cropped == BLUE).all()
    assert stretched[16, 0, 0] > 200 and stretched[16, 0, 2] < 60 and (stretched[:, 8:24] == BLUE).all()
    solid = save(tmp_path / "solid.jpg", np.full((45, 71, 3), (30, 140, 200)), quality=100)
    assert np.abs(load_image(solid).astype(int) - (30, 140, 200)).max() <= 2


def test_the_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32], pixels[:, 32:] = RED, BLUE      # left red, right blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                # shown rotated 90 degrees clockwise: top red, bottom blue
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    shown = load_image(path, "stretch").astype(int)
    assert shown[2, 16, 0] > 200 and shown[-3, 16, 2] > 200


def test_a_folder_gives_its_images_subfolders_included(tmp_path):
    folder = tmp_path / "photos"
    for name in ("b.png", "a.JPG", "sub/c.jpeg", ".hidden/d.png"):
        save(folder / name, noise(8, 8))
    (folder / "notes.txt").write_text("not an image")
    single = save(tmp_path / "single.png", noise(8, 8))
    assert find_images([folder, single, folder / "b.png"]) == [folder / "a.JPG", folder / "b.png",
                                                                folder / "sub" / "c.jpeg", single]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CifarlabError, match="folder .*empty has no .png/.jpg/.jpeg files"):
        find_images([tmp_path / "empty"])
    with pytest.raises(CifarlabError, match="missing.png does not exist"):
        find_images([tmp_path / "missing.png"])


def test_the_command_prints_top_k_and_writes_csv_and_json(tmp_path, model_path, capsys):
    folder = tmp_path / "photos"
    files = [save(folder / "x.png", noise(40, 30)), save(folder / "y.jpg", noise(50, 50, 1))]
    out_csv, out_json = tmp_path / "out" / "p.csv", tmp_path / "out" / "p.json"
    assert main([str(folder), "--model", str(model_path), "--top", "2", "--csv", str(out_csv),
                 "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"model: {model_path}: a7_net, 10 classes, epoch 3, trained on synthetic data")
    assert [line.split(":")[0] for line in printed[1:3]] == [str(f) for f in files]
    assert all(line.count("%") == 2 for line in printed[1:3])
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0]) == ["file", "class_1", "probability_1", "class_2", "probability_2"]
    document = json.loads(out_json.read_text())
    assert [r["file"] for r in rows] == [p["file"] for p in document["predictions"]] == [str(f) for f in files]
    assert float(rows[1]["probability_1"]) == document["predictions"][1]["top"][0]["probability"]
    assert document["preprocessing"]["input_layout"] == "NCHW" and document["model"]["arch"] == "a7_net"
    assert sorted(p.name for p in out_csv.parent.iterdir()) == ["p.csv", "p.json"]   # no temporary left


def test_a_text_file_named_png_is_one_line_from_the_front_door(tmp_path, model_path, capsys):
    from cifarlab.__main__ import main as front_door

    fake = tmp_path / "photo.png"
    fake.write_text("this is not a picture\n")
    assert front_door(["predict", str(fake), "--model", str(model_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == [
        f"error: {fake} is not an image PIL can read (cannot identify image file '{fake}'); allowed: PNG, JPEG or "
        f"another format PIL reads"]


def test_bad_models_and_options_are_one_line(tmp_path, model_path, capsys):
    image = str(save(tmp_path / "x.png", noise(32, 32)))
    model, state = load_checkpoint(model_path)
    info = {key: value for key, value in state.items() if key not in ("arch", "state_dict")}

    def variant(name, arch="a7_net", **change):
        """The tiny run's weights saved as training saves them, under another arch name or class list."""
        path = tmp_path / name
        model.arch = arch
        save_checkpoint(path, model, **{**info, **change})
        return str(path)

    assert "does not exist" in one_error_line(capsys, [image, "--model", str(tmp_path / "none.pt")])
    not_a_model = tmp_path / "notes.pt"
    not_a_model.write_text("hello")
    assert "unreadable (truncated or not a checkpoint)" in one_error_line(capsys, [image, "--model", str(not_a_model)])
    assert "does not fit architecture `resnet18`" in one_error_line(
        capsys, [image, "--model", variant("resnet.pt", arch="resnet18")])
    assert "lists 5 classes (a, b, c, d, e) but its `a7_net` outputs 10 logits" in one_error_line(
        capsys, [image, "--model", variant("five.pt", classes=list("abcde"))])
    assert "has no usable class list" in one_error_line(
        capsys, [image, "--model", variant("nameless.pt", classes=None)])
    assert "--top 11: allowed: 1..10" in one_error_line(capsys, [image, "--model", str(model_path), "--top", "11"])
    assert "cannot access" in one_error_line(capsys, [image, "--model", str(model_path), "--csv", image + "/x.csv"])


# --- experiments, read through DVC without applying them ------------------------------------------

def workspace_state(work):
    status = subprocess.run(["git", "status", "--porcelain"], cwd=work, capture_output=True, text=True).stdout
    return status, (work / "models" / "model.pt").read_bytes()


@pytest.mark.e2e
def test_an_experiments_model_by_name_without_applying_it(preset_runs, tmp_path):
    work, runs = preset_runs
    before = workspace_state(work)
    image = save(tmp_path / "x.png", noise(40, 24))
    for name, arch in (("a", "a7_net"), ("b", "custom_resnet")):
        loaded = load_model(exp=name, repo=work)
        assert loaded.arch == arch and loaded.source.startswith(f"models/model.pt of experiment `{name}` (commit ")
        snapshot = tmp_path / f"{name}.pt"
        snapshot.write_bytes(runs[name]["files"]["models/model.pt"])   # the model that run left in the workspace
        want, _ = load_checkpoint(snapshot)
        got = loaded.model.state_dict()
        assert all(torch.equal(got[key], value) for key, value in want.state_dict().items())
        _, result = predict_files([image], exp=name, repo=str(work), top=1)
        assert result["model"]["arch"] == arch
    assert workspace_state(work) == before            # nothing checked out or applied


@pytest.mark.e2e
def test_an_unknown_experiment_is_one_line_naming_the_known_ones(preset_runs, tmp_path, capsys):
    work, _ = preset_runs
    image = str(save(tmp_path / "x.png", noise(32, 32)))
    line = one_error_line(capsys, [image, "--exp", "nope", "--repo", str(work)])
    assert line == ("error: unknown experiment `nope` (nor a git revision); experiments here: a, a-again, b "
                    "(`dvc exp show` lists them)")
    assert "not in a git repository" in one_error_line(capsys, [image, "--exp", "a", "--repo", str(tmp_path)])
    # A git revision instead of a name: the baseline commit, which has no model (nothing ran there).
    line = one_error_line(capsys, [image, "--exp", "HEAD", "--repo", str(work)])
    assert line.startswith("error: cannot read models/model.pt of revision `HEAD` (commit ") and "DVC cache" in line


@pytest.mark.e2e
def test_a_name_of_experiments_of_two_other_commits_is_ambiguous(preset_runs, tmp_path, capsys):
    """`a` of the baseline and a second `a` under another baseline: ambiguous once neither baseline is
    the current commit (as `dvc exp` resolves names), each full ref listed."""
    work = copy_repo(preset_runs[0], tmp_path / "repo")
    git = functools.partial(subprocess.run, cwd=work, capture_output=True, text=True, check=True)
    (ref_a,) = [line.split()[1] for line in git(["git", "show-ref"]).stdout.splitlines() if line.endswith("/a")]
    other = git(["git", "rev-parse", ref_a]).stdout.strip()    # exp a's commit, as a stand-in second baseline
    second = f"refs/exps/{other[:2]}/{other[2:]}/a"
    git(["git", "update-ref", second, other])
    image = str(save(tmp_path / "x.png", noise(32, 32)))
    assert load_model(exp="a", repo=work).arch == "a7_net"     # the current commit's `a` wins
    git(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "moved on"])
    line = one_error_line(capsys, [image, "--exp", "a", "--repo", str(work)])
    assert line.startswith("error: experiment name `a` is ambiguous") and ref_a in line and second in line
    assert load_model(exp=second, repo=work).arch == "a7_net"  # a full ref is taken as it is
