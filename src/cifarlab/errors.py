"""The one exception type that means "the user's input is wrong", and how stages report it."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

from cifarlab import dvcfile
from cifarlab.lifetime import die_with_parent, launcher_pid, signal_name, stop_on_sigterm, stop_signal


class CifarlabError(Exception):
    """A problem the user can fix (bad params, bad download, missing stage output).

    Stage scripts print its message as one line and exit non-zero; anything else is a bug
    and keeps its traceback.
    """

    exit_code = 1


ERROR_FILE_ENV = "CIFARLAB_ERROR_FILE"   # set by `distributed.launch`: where a process leaves its one line


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`, turning a CifarlabError, an interruption (Ctrl-C, SIGTERM) or an
    unreadable/unwritable file into one line on stderr and a non-zero exit.

    The process dies with its parent (`lifetime.die_with_parent`), so killing `dvc repro` never
    leaves a stage running. Under `dvc repro` the line ends by saying how to get back the outputs
    DVC deleted before running the stage, where `dvc checkout` can restore them.
    """
    die_with_parent(launcher_pid())
    stop_on_sigterm()
    try:
        main()
    except CifarlabError as err:
        _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        signum = stop_signal() or signal.SIGINT
        _fail(f"interrupted ({signal_name(signum)})", 128 + signum)
    except OSError as err:
        if err.filename is None:
            raise                                           # not about a file: a bug, keep the traceback
        _fail(f"cannot access {err.filename}: {err.strerror or err}; check that it exists and that this user may "
              f"read and write it", 1)


def _fail(message: str, code: int) -> None:
    error_file = os.environ.get(ERROR_FILE_ENV)
    if error_file:      # a process of a distributed run: its launcher prints the line, once
        Path(error_file).write_text(message)
    else:
        print(f"error: {message}{restore_hint()}", file=sys.stderr)
    raise SystemExit(code)


def restore_hint(stage: Optional[str] = None, root: Path = Path(".")) -> str:
    """`; DVC removed ...: `dvc checkout STAGE` restores ...` when running under `dvc repro` (which
    deletes a stage's outputs before running it) and the previous outputs are in the DVC cache."""
    stage = stage or os.environ.get("DVC_STAGE")
    if not stage:
        return ""           # run directly: nothing was deleted
    try:
        import yaml

        declared = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
        declared = dvcfile.entries(declared, dvcfile.OUT_KINDS)
        locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage].get("outs", [])
    except (OSError, KeyError, TypeError, AttributeError, ValueError, ImportError):
        return ""           # never completed before (no dvc.lock entry): nothing to restore
    uncached = {path for path, flags in declared if flags.get("cache") is False}
    cache = root / ".dvc" / "cache" / "files" / "md5"
    restorable = [out["path"] for out in locked if out["path"] not in uncached and out.get("md5")
                  and (cache / out["md5"][:2] / out["md5"][2:]).exists()]
    if not restorable:
        return ""
    return (f"; DVC removed the stage's previous outputs before running it: `dvc checkout {stage}` restores "
            f"{', '.join(restorable)}")
