"""Atomic writers: whole files or nothing, created with the user's umask like an ordinary open()."""

from __future__ import annotations

import os
import stat

import pytest

from cifarlab.atomic import atomic_dir, atomic_path, write_bytes, write_json, write_text


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_files_get_the_umask_mode_not_0600(tmp_path, umask):
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "b.json", {"x": 1})
    write_bytes(tmp_path / "c.bin", b"x")
    with atomic_path(tmp_path / "d.png") as tmp:
        tmp.write_bytes(b"x")
    (tmp_path / "plain.txt").write_text("x")      # what open() gives: the reference
    for name in ("a.txt", "b.json", "c.bin", "d.png"):
        assert mode(tmp_path / name) == 0o666 & ~umask == mode(tmp_path / "plain.txt"), name


def test_directories_get_the_umask_mode_not_0700(tmp_path, umask):
    for _ in range(2):    # the second time replaces an existing directory
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    assert mode(tmp_path / "out") == 0o777 & ~umask == mode(tmp_path / "plain")
    assert (tmp_path / "out" / "sub" / "f.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]    # no temporaries left


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
