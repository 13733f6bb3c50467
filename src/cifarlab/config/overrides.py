"""`-S` overrides checked before DVC sees them: a typo gets a did-you-mean instead of Hydra's
"unexpected error ... use +key".

    python -m cifarlab check -S preset=assignment7 -S train.epoch=3   # error: ... did you mean `train.epochs`?
    python -m cifarlab run -n a7 -S preset=assignment7                # check, then `dvc exp run` the same arguments

Each override is checked as `dvc exp run` would compose it: `preset=` and `budget=` must name a file
of conf/preset/ or conf/budget/, every other key must be a key of params.yaml (a leading `+`, which
adds a key, is refused the same way: the stages refuse unknown keys), and the composed params must
pass the stages' own value checks. A sweep (`train.seed=range(1,4)`, `a,b`) is checked for each of
its values, as DVC's queue would run them.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path
from typing import Sequence

import yaml

from cifarlab.config.compose import compose_text
from cifarlab.config.params import ParamsError, apply_overrides, parse_params
from cifarlab.errors import CifarlabError

GROUPS = ("preset", "budget")     # the config groups of conf/: a name picks one of their files


def _did_you_mean(value: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, allowed, n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _sweeps(overrides: Sequence[str]) -> list[list[str]]:
    """The override lists a sweep expands to (one list when nothing sweeps), as DVC expands them."""
    from dvc.utils.hydra import get_hydra_sweeps

    try:
        return [sweep["params.yaml"] for sweep in get_hydra_sweeps({"params.yaml": list(overrides)})]
    except Exception as err:   # noqa: BLE001  (Hydra's override parser: any failure is a malformed override)
        raise ParamsError(f"-S {' '.join(overrides)}: not a valid override ({str(err).splitlines()[0]})") from None


def check(overrides: Sequence[str], conf: Path = Path("conf")) -> int:
    """Raise a one-line ParamsError for the first override that `dvc exp run` would refuse or the
    stages would reject; return how many runs the overrides make (a sweep makes several)."""
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"-S {item!r}: expected key=value, e.g. train.max_lr=0.003")
    sweeps = _sweeps(overrides)
    for sweep in sweeps:
        groups, keys = [], []
        for item in sweep:
            key, _, value = item.lstrip("+~").partition("=")
            if key in GROUPS:
                names = sorted(path.stem for path in (conf / key).glob("*.yaml"))
                if value not in names:
                    raise ParamsError(f"-S {key}={value}: no such {key}{_did_you_mean(value, names)}; "
                                      f"allowed: {', '.join(names)} (the files of conf/{key}/)")
                groups.append(f"{key}={value}")
            else:
                keys.append(f"{key}={value}")
        base = yaml.safe_load(compose_text(groups, conf))
        apply_overrides(base, keys, option="-S")             # unknown key: one line with a did-you-mean
        parse_params(yaml.safe_load(compose_text([*groups, *keys], conf)))
    return len(sweeps)


def main(argv: Sequence[str] | None = None, run: bool = False) -> int:
    prog = "python -m cifarlab " + ("run" if run else "check")
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments are passed to `dvc exp run` (run) or ignored (check).")
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--conf", type=Path, default=Path("conf"), help="config folder (default: conf)")
    args, rest = parser.parse_known_args(argv)
    try:
        count = check(args.set_param, args.conf)
    except CifarlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not run:
        print(f"ok: {count} run{'s' if count != 1 else ''} of valid params", file=sys.stderr)
        return 0
    passed = [*rest, *(item for value in args.set_param for item in ("-S", value))]
    os.execvp(sys.executable, [sys.executable, "-m", "dvc", "exp", "run", *passed])
    return 0   # not reached


def run_main(argv: Sequence[str] | None = None) -> int:
    return main(argv, run=True)


if __name__ == "__main__":
    sys.exit(main())
