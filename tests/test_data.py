import hashlib
import http.server
import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cifarlab.data.sources import fetch, make_synthetic, read_cifar10_tarball
from cifarlab.data.storage import CIFAR10_CLASSES, DataError, load_dataset, save_dataset
from conftest import copy_stages, merge, run, run_script, tool_env, write_params


def test_synthetic_is_deterministic_and_cifar_shaped():
    a, b = make_synthetic(300, 100, seed=3), make_synthetic(300, 100, seed=3)
    assert a.train.images.shape == (300, 32, 32, 3) and a.train.images.dtype == np.uint8
    assert a.test.images.shape == (100, 32, 32, 3)
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
    assert np.bincount(a.train.labels, minlength=10).tolist() == [30] * 10
    assert not np.array_equal(a.train.images, make_synthetic(300, 100, seed=4).train.images)


def test_synthetic_classes_differ_but_not_per_pixel_trivially():
    data = make_synthetic(1000, 10, seed=0)
    means = np.stack([data.train.images[data.train.labels == c].mean(axis=(0, 1, 2)) for c in range(10)])
    assert np.ptp(means, axis=0).max() > 30          # classes are distinguishable ...
    assert data.train.images.std() > 20              # ... and images are noisy, not flat prototypes


def test_save_and_load_round_trip(tmp_path):
    data = make_synthetic(50, 20, seed=1)
    save_dataset(data, tmp_path / "data")
    loaded = load_dataset(tmp_path / "data")
    assert loaded.source == "synthetic" and loaded.classes == data.classes
    assert np.array_equal(loaded.train.images, data.train.images)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["meta.json", "test.npz", "train.npz"]


def test_load_rejects_a_cifar10_test_split_of_the_wrong_size(tmp_path):
    data = make_synthetic(50, 20, seed=1)
    save_dataset(data, tmp_path / "data")
    meta = tmp_path / "data" / "meta.json"
    text = meta.read_text().replace('"synthetic"', '"cifar10"')
    for i, name in enumerate(CIFAR10_CLASSES):
        text = text.replace(f'"synthetic-{i}"', f'"{name}"')
    meta.write_text(text)
    with pytest.raises(DataError, match="says 50 train / 20 test images; CIFAR-10 has 50000 / 10000"):
        load_dataset(tmp_path / "data")


# --- the real download code, against a tarball served on 127.0.0.1 -------------------------------

def _batch(count: int, start: int) -> bytes:
    planes = np.empty((count, 3, 1024), dtype=np.uint8)
    planes[:, 0], planes[:, 1], planes[:, 2] = 10, 20, 30            # R, G, B planes as CIFAR stores them
    planes[:, 0, 0] = (np.arange(count) + start) % 256                # first red pixel identifies the image
    return pickle.dumps({b"data": planes.reshape(count, 3072), b"labels": [(start + i) % 10 for i in range(count)]})


@pytest.fixture(scope="module")
def cifar_tarball(tmp_path_factory) -> tuple[Path, str]:
    """A tarball laid out like the official python version, with full split sizes."""
    path = tmp_path_factory.mktemp("mirror") / "cifar-10-python.tar.gz"
    members = {f"cifar-10-batches-py/data_batch_{i}": _batch(10_000, (i - 1) * 10_000) for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = _batch(10_000, 0)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES]})
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path, hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(cifar_tarball):
    """An HTTP server on 127.0.0.1 serving the tarball's directory; yields its base URL."""
    directory = cifar_tarball[0].parent

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_and_convert(server, cifar_tarball, tmp_path):
    dest = tmp_path / "c.tar.gz"
    fetch(f"{server}/cifar-10-python.tar.gz", dest, cifar_tarball[1])
    data = read_cifar10_tarball(dest)
    assert (len(data.train), len(data.test)) == (50_000, 10_000)
    assert data.classes == CIFAR10_CLASSES
    assert data.train.images.shape == (50_000, 32, 32, 3)
    assert data.train.images[0, 0, 1].tolist() == [10, 20, 30]          # CHW planes became HWC
    assert data.train.images[12_345, 0, 0, 0] == 12_345 % 256
    assert data.train.labels[12_345] == 12_345 % 10


def test_fetch_wrong_md5(server, tmp_path):
    with pytest.raises(DataError, match="md5 of .* is [0-9a-f]{32} but data.md5 is 0{32}"):
        fetch(f"{server}/cifar-10-python.tar.gz", tmp_path / "c.tar.gz", "0" * 32)


def test_fetch_missing_file_suggests_mirror_or_synthetic(server, tmp_path):
    with pytest.raises(DataError, match="mirror.*synthetic"):
        fetch(f"{server}/nothing-here.tar.gz", tmp_path / "c.tar.gz", "0" * 32)


def test_truncated_tarball_is_a_clear_error(cifar_tarball, tmp_path):
    truncated = tmp_path / "t.tar.gz"
    truncated.write_bytes(cifar_tarball[0].read_bytes()[:100_000])
    with pytest.raises(DataError, match="not a readable CIFAR-10 python tarball"):
        read_cifar10_tarball(truncated)


def _stage_dir(tmp_path: Path, params: dict) -> Path:
    work = tmp_path / "work"
    copy_stages(work)
    write_params(work, params)
    return work


def test_download_stage_with_right_md5(server, cifar_tarball, tmp_path, default_params):
    params = merge(default_params, {"data": {"url": f"{server}/cifar-10-python.tar.gz", "md5": cifar_tarball[1]}})
    work = _stage_dir(tmp_path, params)
    run(["python", "stages/download.py"], work)
    data = load_dataset(work / "data")
    assert (data.source, len(data.train), len(data.test)) == ("cifar10", 50_000, 10_000)
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []     # no temporaries left


def test_download_stage_with_wrong_md5_leaves_nothing(server, tmp_path, default_params):
    params = merge(default_params, {"data": {"url": f"{server}/cifar-10-python.tar.gz", "md5": "f" * 32}})
    work = _stage_dir(tmp_path, params)
    result = run(["python", "stages/download.py"], work, check=False)
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "data.md5" in error_lines[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in work.iterdir()) == ["params.yaml", "stages"]


def test_download_stage_unreachable_url(tmp_path, default_params):
    params = merge(default_params, {"data": {"url": "http://127.0.0.1:9/cifar.tar.gz"}})
    work = _stage_dir(tmp_path, params)
    result = run(["python", "stages/download.py"], work, check=False)
    assert result.returncode == 1
    assert "cannot download http://127.0.0.1:9/cifar.tar.gz" in result.stderr and "synthetic" in result.stderr
    assert not (work / "data").exists()


def test_download_stage_failure_keeps_previous_data(server, tmp_path, default_params):
    params = merge(default_params, {"data": {"url": f"{server}/cifar-10-python.tar.gz", "md5": "f" * 32}})
    work = _stage_dir(tmp_path, params)
    save_dataset(make_synthetic(20, 10, 0), work / "data")
    assert run(["python", "stages/download.py"], work, check=False).returncode == 1
    assert load_dataset(work / "data").source == "synthetic"


# --- data files validated on load, in every stage ----------------------------------------------------

def _rewrite(data_dir: Path, split: str, **arrays) -> None:
    with np.load(data_dir / f"{split}.npz") as old:
        current = {"images": old["images"], "labels": old["labels"]}
    current.update(arrays)
    np.savez(data_dir / f"{split}.npz", **current)


def _corrupt(data_dir: Path, case: str) -> None:
    if case == "28x28 images":
        with np.load(data_dir / "train.npz") as old:
            _rewrite(data_dir, "train", images=np.ascontiguousarray(old["images"][:, :28, :28]))
    elif case == "float images":
        with np.load(data_dir / "test.npz") as old:
            _rewrite(data_dir, "test", images=old["images"].astype(np.float32))
    elif case == "label 10 of 10 classes":
        with np.load(data_dir / "train.npz") as old:
            labels = old["labels"].copy()
        labels[3] = 10
        _rewrite(data_dir, "train", labels=labels)
    elif case == "negative label":
        with np.load(data_dir / "test.npz") as old:
            labels = old["labels"].copy()
        labels[0] = -1
        _rewrite(data_dir, "test", labels=labels)
    elif case == "random bytes":
        (data_dir / "test.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "a pickle":
        (data_dir / "test.npz").write_bytes(pickle.dumps({"images": [1, 2, 3]}))
    elif case == "no labels array":
        with np.load(data_dir / "test.npz") as old:
            np.savez(data_dir / "test.npz", images=old["images"])
    elif case == "split size not meta's":
        with np.load(data_dir / "test.npz") as old:
            _rewrite(data_dir, "test", images=old["images"][:10], labels=old["labels"][:10])
    elif case == "duplicate class names":
        meta = data_dir / "meta.json"
        meta.write_text(meta.read_text().replace('"synthetic-1"', '"synthetic-0"'))
    elif case == "missing test.npz":
        (data_dir / "test.npz").unlink()
    else:
        raise AssertionError(case)


BAD_DATA = {   # case -> what the one line must say
    "28x28 images": "data/train.npz holds images of shape 50x28x28x3 uint8; allowed: N x 32 x 32 x 3 uint8",
    "float images": "data/test.npz holds images of shape 20x32x32x3 float32; allowed: N x 32 x 32 x 3 uint8",
    "label 10 of 10 classes": "data/train.npz holds 1 labels outside 0..9 (e.g. 10); allowed: 0..9",
    "negative label": "data/test.npz holds 1 labels outside 0..9 (e.g. -1)",
    "random bytes": "data/test.npz is not a readable .npz of `images` and `labels` arrays",
    "a pickle": "data/test.npz is not a readable .npz of `images` and `labels` arrays",
    "no labels array": "data/test.npz has no array 'labels'",
    "split size not meta's": "data/test.npz holds 10 images; meta.json says 20",
    "duplicate class names": "allowed: a list of at least 2 distinct class names",
    "missing test.npz": "data/test.npz does not exist",
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_file_is_one_line_with_how_to_restore(tmp_path, monkeypatch, case):
    save_dataset(make_synthetic(50, 20, seed=1), tmp_path / "data")
    _corrupt(tmp_path / "data", case)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(Path("data"))
    text = str(err.value)
    assert "\n" not in text and BAD_DATA[case] in text
    assert "dvc checkout data" in text and "dvc repro download" in text
    assert "allow_pickle" not in text


@pytest.mark.parametrize("stage,case", [("lr_find", "random bytes"), ("train", "label 10 of 10 classes"),
                                        ("train", "28x28 images"), ("evaluate", "random bytes")])
def test_every_stage_validates_the_data(stage_dir, stage, case):
    if stage == "lr_find":      # with a numeric train.max_lr it reads no data (a no-op): run the range test
        from conftest import params_in
        write_params(stage_dir, merge(params_in(stage_dir), {"lr_find": {"when": "always"}}))
    _corrupt(stage_dir / "data", case)
    result = run_script(stage_dir, f"stages/{stage}.py", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]          # one line, no traceback
    assert result.stderr.startswith("error: data/") and "dvc checkout data" in result.stderr
    assert not (stage_dir / "metrics").exists() and not (stage_dir / "models").exists()   # nothing half-written


def test_download_that_is_not_a_tarball_names_the_url(server, cifar_tarball, tmp_path, default_params):
    page = cifar_tarball[0].parent / "index.html"
    page.write_text("<html>a mirror's landing page, not the tarball</html>")
    url = f"{server}/index.html"
    params = merge(default_params, {"data": {"url": url, "md5": hashlib.md5(page.read_bytes()).hexdigest()}})
    work = _stage_dir(tmp_path, params)
    result = run(["python", "stages/download.py"], work, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: the download from {url} is not a readable CIFAR-10 python tarball" in result.stderr
    assert "/tmp" not in result.stderr.replace(url, "") and "data.url" in result.stderr


@pytest.fixture
def slow_server(tmp_path):
    """An HTTP server on 127.0.0.1 that sends a large body slowly (a download to interrupt); yields
    its URL and an event set once the first bytes went out."""
    sending = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(100 << 20))
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x" * 65536)
                    self.wfile.flush()
                    sending.set()
                    time.sleep(0.05)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/cifar.tar.gz", sending
    httpd.shutdown()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_signal_during_download_leaves_no_partial_file(slow_server, tmp_path, default_params, signum):
    """The download goes to a file with no name (O_TMPFILE): nothing to clean up, even when the stage
    is killed outright, as it is when `dvc repro`'s group is killed (the stage dies with DVC)."""
    url, sending = slow_server
    temp = tmp_path / "tmp"
    temp.mkdir()
    work = _stage_dir(tmp_path, merge(default_params, {"data": {"url": url}}))
    env = dict(tool_env(), TMPDIR=str(temp))
    process = subprocess.Popen([sys.executable, "stages/download.py"], cwd=work, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert sending.wait(60), "the download never started"
    time.sleep(0.3)
    assert list(temp.iterdir()) == []                  # mid-download: no named file
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    if signum == signal.SIGTERM:
        assert process.returncode == 143 and "Traceback" not in stderr
        assert [line for line in stderr.splitlines() if line.startswith("error:")] == ["error: interrupted (SIGTERM)"]
    else:
        assert process.returncode == -signal.SIGKILL
    assert list(temp.iterdir()) == [] and not (work / "data").exists()


def test_unwritable_output_is_one_line(stage_dir, tiny_params):
    write_params(stage_dir, merge(tiny_params, {"model": {"name": "a7_net"}}))
    (stage_dir / "metrics").write_text("a file where the metrics directory should be")
    result = run_script(stage_dir, "stages/lr_find.py", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot access metrics"), result.stderr[-2000:]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_metrics_is_one_line(stage_dir, tiny_params):
    (stage_dir / "metrics").mkdir()
    (stage_dir / "metrics").chmod(0o555)
    write_params(stage_dir, merge(tiny_params, {"model": {"name": "a7_net"}}))
    result = run_script(stage_dir, "stages/lr_find.py", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: cannot access metrics" in result.stderr and "Permission denied" in result.stderr
