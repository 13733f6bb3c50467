"""Stage scripts run as `python stages/<name>.py` runs them, minus the seconds of imports.

A stage process spends about 4 s importing torch, torch's compiler stack (every optimizer imports
it), albumentations and matplotlib before any work, and the stage-level tests start dozens of them.
`start` forks each run from a multiprocessing forkserver that imported those libraries once (and
never ran a torch op, so no thread pool is copied half-started) instead. The child then does what
the interpreter does for a script: the working directory and environment given, stdout and stderr
to files, the script's folder first on sys.path, `__name__ == "__main__"`. The stage's own code
(`cifarlab` from the working directory's src/, via stages/_src.py) is imported fresh in every
child, so each run executes the files it would as a subprocess. Signals reach the child as they
would a subprocess, and its exit code is the one a subprocess would have (negative: killed).

This module is what the forkserver imports to run a child, so it imports nothing heavy itself.
"""

from __future__ import annotations

import io
import os
import runpy
import sys

# What every stage process imports before any work (the rest is small or imported fresh).
PRELOAD = ["torch", "torch._dynamo", "torch.optim", "numpy", "matplotlib.pyplot", "albumentations", "dvclive",
           "tqdm", "yaml", "ruamel.yaml", "torchinfo", "torch_lr_finder", "filelock", "dvc.repo"]


def child(script: str, cwd: str, env: dict, stdout: str, stderr: str, args: list) -> None:
    """Run `script` (relative to `cwd`) as `python script *args` would, its output into two files."""
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    run_as_script(script, cwd, env, args)


def run_as_script(script: str, cwd: str, env: dict, args: list) -> None:
    """In a forked child whose descriptors 1 and 2 are set: run `script` as `python script *args`
    would in `cwd` with `env` (tests/stage_server.py's children do this too)."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # Unbuffered, as PYTHONUNBUFFERED makes a subprocess: a SIGKILL loses no line already printed.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
