"""cifarlab.tools.notebook, the quickstart notebook's helpers: progress bars summarised, the offline
fallback to the synthetic set, the report's first screen (the notebook itself runs in tests/e2e)."""

from __future__ import annotations

import socket

from cifarlab.tools import notebook


def test_a_progress_bar_prints_once_in_its_last_state():
    stream = [b"Running stage 'train':\n", b"  0%|   | 0/3\r 33%|#  | 1/3\r", b" 66%|## | 2/3\r100%|###| 3/3\n",
              b"done\r\n", b"tail without newline\rlast"]
    assert list(notebook.summarised(stream)) == ["Running stage 'train':", "100%|###| 3/3", "done", "last"]


def test_cifar10_unreachable_falls_back_to_synthetic_with_one_line(capsys):
    with socket.socket() as sock:                      # a port on this machine that nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/cifar-10-python.tar.gz"
    assert notebook.data_source("cifar10", url) == "synthetic"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"CIFAR-10 cannot be downloaded from {url} (")
    assert lines[0].endswith('using the synthetic set instead (DATA = "synthetic")')
    assert notebook.data_source("synthetic", url) == "synthetic" and capsys.readouterr().out == ""


def test_the_official_url_is_the_configs():
    import yaml

    from conftest import REPO
    config = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())
    assert notebook.official_url(REPO / "conf" / "config.yaml") == config["data"]["url"]


def test_first_screen_is_the_title_and_two_sections_then_a_link():
    report = "# T\n\nintro\n\n## Result\n\nr\n\n## Run\n\nx\n\n## Curves\n\nc\n\n## Params\n\np\n"
    shown = notebook.first_screen(report)
    assert shown.startswith("# T\n\nintro\n\n## Result") and "## Run\n\nx" in shown and "## Curves" not in shown
    assert shown.rstrip().endswith("*The rest of the report (Curves, Params) is in [reports/report.md](../reports/report.md).*")
    assert notebook.first_screen("# T\n\n## Only\n") == "# T\n\n## Only\n"
