"""params.yaml from conf/: the composition `dvc exp run` makes, written with each key's comment.

With `hydra.enabled` (.dvc/config), `dvc exp run` composes conf/config.yaml (every key, commented
with its unit or meaning) with one preset from conf/preset/ and writes params.yaml, without
comments. The committed params.yaml is that same composition for the default preset, with each
key's comment copied after its value so the file reads on its own. After editing conf/:

    python -m cifarlab compose            # rewrite params.yaml
    python -m cifarlab compose --check    # exit 1 if params.yaml is not conf/'s composition
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from cifarlab.atomic import atomic_path

PARAMS_HEADER = """\
# GENERATED from conf/. Every key, with its units and meaning, is in conf/config.yaml; each
# assignment's recipe is a preset in conf/preset/. This file is the composition of
# conf/config.yaml with the default preset (assignment10) and budget (full, conf/budget/), and it
# is what `dvc repro` runs. `dvc exp run` rewrites it from conf/ (this header too), e.g.
# `dvc exp run -S preset=assignment7 -S budget=quick` or `dvc exp run -S train.max_lr=0.003`, so an
# edit made here lasts only until then: make lasting changes in conf/, then regenerate this file
# with `python -m cifarlab compose`.
"""


def compose_text(overrides: list[str] = (), conf: Path = Path("conf")) -> str:
    """params.yaml as `dvc exp run -S <overrides>` writes it (the same DVC function, same arguments)."""
    from dvc.utils.hydra import compose_and_dump

    conf = conf.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(out, str(conf), None, "config", str(conf.parent), list(overrides))
        return out.read_text()


def key_comments(config: Path) -> dict[tuple[str, str], str]:
    """(section, key) -> the inline comment that explains the key in conf/config.yaml."""
    comments, section = {}, None
    for line in config.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            section = line.split(":")[0]
        elif "#" in line and ":" in line:
            key = line.split(":")[0].strip().lstrip("- ")
            comments[(section, key)] = line.split("#", 1)[1].strip()
    return comments


def annotate(composed: str, config: Path) -> str:
    """The composed params with each key's comment from `config` after its value."""
    comments, section, out = key_comments(config), None, []
    for line in composed.splitlines():
        if line and not line.startswith(" "):
            section = line.split(":")[0]
        elif line.strip() and (comment := comments.get((section, line.split(":")[0].strip()))) is not None:
            line = f"{line:<30} # {comment}"
        out.append(line)
    return "\n".join(out) + "\n"


def body(text: str) -> str:
    """`text` without its leading comment header."""
    lines = text.splitlines(keepends=True)
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return "".join(lines)


def uncommented(text: str) -> str:
    """params.yaml's text without its header and the key comments `annotate` added."""
    return "".join(line.split(" # ", 1)[0].rstrip() + "\n" for line in body(text).splitlines())


def params_text(conf: Path = Path("conf")) -> str:
    """The committed params.yaml's text: header + the default composition, keys commented."""
    return PARAMS_HEADER + "\n" + annotate(compose_text(conf=conf), conf / "config.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifarlab compose", description=__doc__.splitlines()[0])
    parser.add_argument("--conf", type=Path, default=Path("conf"), help="config folder (default: conf)")
    parser.add_argument("--out", type=Path, default=Path("params.yaml"), help="file to write (default: params.yaml)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out is out of date")
    args = parser.parse_args(argv)
    if not (args.conf / "config.yaml").is_file():
        print(f"error: {args.conf / 'config.yaml'} does not exist; run from the repository root or pass --conf",
              file=sys.stderr)
        return 1
    text = params_text(args.conf)
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"error: {args.out} is not the composition of {args.conf}/; run `python -m cifarlab compose`",
                  file=sys.stderr)
            return 1
        print(f"{args.out} is up to date with {args.conf}/", file=sys.stderr)
        return 0
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    print(f"wrote {args.out} from {args.conf}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
