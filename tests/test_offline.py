"""No import in any stage touches the network: with sockets refused, importing everything the stages
import prints nothing (albumentations' version check would warn "Error fetching version info")."""

import subprocess
import sys

from conftest import REPO, tool_env

REFUSE_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def test_importing_the_stages_libraries_needs_no_network(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(REFUSE_NETWORK)
    env = tool_env()
    env.pop("NO_ALBUMENTATIONS_UPDATE", None)
    env["PYTHONPATH"] = f"{tmp_path}:{REPO / 'src'}"
    modules = ["cifarlab.data.augment", "cifarlab.data.storage", "cifarlab.data.sources", "cifarlab.data.loaders", "cifarlab.engine.loops", "cifarlab.pipeline.train", "cifarlab.pipeline.lr_find", "cifarlab.pipeline.report.document",
               "cifarlab.engine.gradcam", "cifarlab.engine.metrics", "albumentations", "dvclive", "torch_lr_finder"]
    code = "import socket, urllib.request\n" + "".join(f"import {m}\n" for m in modules) + (
        "import time; time.sleep(3)\n"   # albumentations checks in a thread: give it time to warn
        "socket.getaddrinfo('pypi.org', 443)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    # the last line proves the sockets were refused, so a network call would have failed and warned
    assert "network disabled by the test" in result.stderr
    assert "Error fetching version info" not in result.stderr and "Warning" not in result.stderr, result.stderr
