"""The one exception type that means "the user's input is wrong", how stages report it, and what
every stage guarantees through `run_stage`: what DVC records for it is what it ran (`ParamsRead`)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

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
    DVC deleted before running the stage, where `dvc checkout` can restore them. The params the
    stage reads are read once more after `main` (`ParamsRead`): if params.yaml changed under the
    stage, its outputs are removed and it fails, so DVC locks nothing for params it did not run.
    """
    die_with_parent(launcher_pid())
    stop_on_sigterm()
    try:
        read = ParamsRead.at_start()
        main()
        if read is not None:
            read.check_unchanged()
    except CifarlabError as err:
        _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        signum = stop_signal() or signal.SIGINT
        _fail(f"interrupted ({signal_name(signum)})", 128 + signum)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):    # a write outside `cifarlab.atomic` (e.g. dvclive's)
            where = f" writing {err.filename}" if err.filename else ""
            _fail(f"the disk is full{where} ({err.strerror}); free some space and rerun", 1)
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
    uncached = [path for path, flags in declared if flags.get("cache") is False]
    cache = root / ".dvc" / "cache" / "files" / "md5"
    restorable = [out["path"] for out in locked if out["path"] not in uncached and out.get("md5")
                  and (cache / out["md5"][:2] / out["md5"][2:]).exists()]
    tracked = _git_tracked(uncached, root)
    ways = ([f"`dvc checkout {stage}` restores {', '.join(restorable)}"] if restorable else []) + (
        [f"`git checkout -- {' '.join(tracked)}` restores {', '.join(tracked)}"] if tracked else [])
    if not ways:
        return ""
    return f"; DVC removed the stage's previous outputs before running it: {'; '.join(ways)}"


def _git_tracked(paths: list[str], root: Path) -> list[str]:
    """Those of `paths` (files or folders) that git tracks: DVC deletes them too, and git restores them."""
    if not paths:
        return []
    try:
        listed = subprocess.run(["git", "ls-files", "--", *paths], cwd=root, capture_output=True, text=True,
                                timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    return [path for path in paths if path in listed or any(f.startswith(path.rstrip("/") + "/") for f in listed)]


# --- what DVC records is what the stage ran -------------------------------------------------------

PARAMS_FILE = "params.yaml"
LAUNCHER_PARAMS_ENV = "CIFARLAB_STAGE_PARAMS"   # what a distributed run's launcher read, for its processes


class ParamsChanged(CifarlabError):
    """params.yaml changed while the stage ran: DVC would lock params the stage did not run."""


@dataclass(frozen=True)
class ParamsRead:
    """The params a stage reads, as they were when it started: the keys dvc.yaml's `params:` lists
    for it (what DVC records in dvc.lock and its run-cache for the stage), and their values.

    DVC reads those keys from params.yaml again after the stage's command exits and records that,
    while the stage ran on what it read when it started: an edit in between (by hand, or a second
    `dvc exp run` composing params.yaml in the same workspace) would lock, and run-cache, params the
    outputs do not come from. So `run_stage` records them first (`at_start`) and compares them again
    once the stage has written its outputs (`check_unchanged`). The processes of a distributed run
    each read params.yaml when they start: they compare what they read with their launcher's.
    """

    stage: str
    values: dict      # {file: {key: value}}, keys absent from the file left out; JSON types

    @classmethod
    def at_start(cls, root: Path = Path(".")) -> Optional["ParamsRead"]:
        """The stage's params now; None when this is no stage of root's dvc.yaml, or dvc.yaml or a
        params file cannot be read (the stage itself then says what is wrong). A process started by
        a distributed launcher checks at once that it reads what its launcher read."""
        stage = _stage_name()
        if stage is None:
            return None
        try:
            read = cls(stage, _read_values(_declared_params(stage, root), root))
        except Exception:  # noqa: BLE001 - no dvc.yaml entry, unreadable YAML...: nothing to guard here
            return None
        launcher = os.environ.get(LAUNCHER_PARAMS_ENV) if launcher_pid() is not None else None
        if launcher is not None:
            read._fail_if_changed(json.loads(launcher), read.values)
            return None                       # the launcher checks again once every process has ended
        os.environ[LAUNCHER_PARAMS_ENV] = json.dumps(read.values)
        return read

    def check_unchanged(self, root: Path = Path(".")) -> None:
        """Raise ParamsChanged, after removing the stage's outputs, if the params differ from `values`."""
        try:
            now = _read_values(_declared_params(self.stage, root), root)
        except Exception as err:  # noqa: BLE001 - e.g. invalid YAML, caught mid-edit
            _remove_outputs(self.stage, root)
            raise ParamsChanged(f"{', '.join(self.values)} changed while {self.stage} was running (it cannot be "
                                f"read now: {' '.join(str(err).split())[:150]}): nothing was recorded; rerun") from None
        self._fail_if_changed(self.values, now, remove_outputs_in=root)

    def _fail_if_changed(self, before: dict, now: dict, remove_outputs_in: Optional[Path] = None) -> None:
        changed = _differences(before, now)
        if not changed:
            return
        if remove_outputs_in is not None:
            _remove_outputs(self.stage, remove_outputs_in)
        changes = [f"{key} {_shown(old)} -> {_shown(new)}" for diff in changed.values()
                   for key, (old, new) in diff.items()]
        shown = ", ".join(changes[:3]) + (f", and {len(changes) - 3} more" if len(changes) > 3 else "")
        raise ParamsChanged(f"{', '.join(changed)} changed while {self.stage} was running ({shown}): "
                            f"nothing was recorded; rerun")


_MISSING = object()


def _stage_name() -> Optional[str]:
    """The stage this process runs: DVC names it (DVC_STAGE); run by hand, `stages/<name>.py`."""
    stage = os.environ.get("DVC_STAGE")
    if stage:
        return stage.rpartition(":")[2]
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    return script.stem if script is not None and script.parent.name == "stages" else None


def _yaml(path: Path) -> Any:
    from ruamel.yaml import YAML   # as DVC reads params.yaml (YAML 1.2)

    return YAML(typ="safe").load(path.read_text())


def _declared_params(stage: str, root: Path) -> dict[str, list[str]]:
    """{params file: keys} of `stage` in dvc.yaml; an empty list is the whole file."""
    declared: dict[str, list[str]] = {}
    for item in _yaml(root / "dvc.yaml")["stages"][stage].get("params") or []:
        if isinstance(item, dict):        # {other.yaml: [keys]} (or no keys: the whole file)
            for file, keys in item.items():
                declared.setdefault(str(file), []).extend(keys or [])
        else:
            declared.setdefault(PARAMS_FILE, []).append(str(item))
    return declared


def _read_values(declared: dict[str, list[str]], root: Path) -> dict:
    values = {}
    for file, keys in declared.items():
        raw = _yaml(root / file)
        chosen = {key: _lookup(raw, key) for key in keys} if keys else {"(the whole file)": raw}
        values[file] = json.loads(json.dumps({k: v for k, v in chosen.items() if v is not _MISSING}, default=str))
    return values


def _lookup(raw: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(raw, dict) or part not in raw:
            return _MISSING
        raw = raw[part]
    return raw


def _leaves(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {name: leaf for key, item in value.items() for name, leaf in _leaves(f"{prefix}.{key}", item).items()}
    return {prefix: value}


def _differences(before: dict, now: dict) -> dict[str, dict[str, tuple[Any, Any]]]:
    """{file: {key: (old, new)}} of every leaf that differs, keys named as in the file (`train.epochs`)."""
    out = {}
    for file in sorted(set(before) | set(now)):
        old, new = ({name: leaf for key, value in side.get(file, {}).items()
                     for name, leaf in _leaves(key, value).items()} for side in (before, now))
        diff = {key: (old.get(key, _MISSING), new.get(key, _MISSING)) for key in dict.fromkeys([*old, *new])
                if old.get(key, _MISSING) != new.get(key, _MISSING)}
        if diff:
            out[file] = diff
    return out


def _shown(value: Any) -> str:
    if value is _MISSING:
        return "(missing)"
    return value if isinstance(value, str) else json.dumps(value)


def _remove_outputs(stage: str, root: Path) -> None:
    """Every output dvc.yaml declares for `stage` (outs, metrics, plots), gone."""
    try:
        declared = dvcfile.paths(_yaml(root / "dvc.yaml")["stages"][stage], *dvcfile.OUT_KINDS)
    except Exception:  # noqa: BLE001 - dvc.yaml read at the start; if it is unreadable now, there is nothing to go by
        return
    for name in declared:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
