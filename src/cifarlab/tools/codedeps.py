"""The code each stage depends on, derived from the import graph: the one home of dvc.yaml's code deps.

A stage's code deps are its script, `stages/_src.py`, and every library file the script imports,
transitively, resolved per file: `from cifarlab.data.storage import Dataset` is
`src/cifarlab/data/storage.py`, not the whole `data/` wing, so editing the report reruns only
`report`. A module that imports the modules of its own folder by name (`importlib`, as the model
registry does to register its networks) makes that whole folder one dep. Package markers
(`__init__.py`) are not deps: the wings' are empty (a test checks it) and the root's holds only
the version and an environment default. dvc.yaml lists the deps so that a code change reruns
exactly the stages it can affect, and the train stage's run fingerprint hashes the same list.
Nobody edits them by hand:

    python -m cifarlab codedeps            # rewrite the code deps in dvc.yaml (comments kept)
    python -m cifarlab codedeps --check    # exit 1 naming each stage whose list is stale (CI runs this)

Deps that are not code (data, another stage's outs) stay where they are in each list.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from ruamel.yaml import YAML

PACKAGE = "cifarlab"
STAGE_HELPER = "stages/_src.py"
MARKER = "__init__.py"


def imported_names(tree: ast.AST) -> set[str]:
    """Every absolute name a module's imports mention (`from a.b import c` gives `a.b` and `a.b.c`)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _imports_by_name(tree: ast.AST) -> bool:
    """Whether the module calls `importlib.import_module` (it then imports modules of its folder by name)."""
    return any(isinstance(node, ast.Attribute) and node.attr == "import_module" for node in ast.walk(tree))


def module_path(name: str, src: Path) -> Path | None:
    """The library file that module `name` is (the longest existing module path: `cifarlab.data.storage.Dataset`
    is data/storage.py), or None for a package marker or a name outside the library."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    for end in range(len(parts), 1, -1):
        base = src.joinpath(*parts[:end])
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        if (base / MARKER).is_file():
            return None
    return None


def library_paths(script: Path, src: Path) -> list[Path]:
    """Every library file under `src` that `script` imports, transitively; a folder whose module imports
    its neighbours by name stands for all of them."""
    files: set[Path] = set()
    folders: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        tree = ast.parse(path.read_text(), filename=str(path))
        found = {module_path(name, src) for name in imported_names(tree)} - {None}
        if path != script and _imports_by_name(tree) and path.parent not in folders:
            folders.add(path.parent)
            found |= set(path.parent.glob("*.py")) - {path.parent / MARKER}
        for module in found - files:
            files.add(module)
            todo.append(module)
    return sorted(folders | {path for path in files if path.parent not in folders})


def code_deps(stage: str, root: Path = Path(".")) -> list[str]:
    """The code deps of `stage` as dvc.yaml lists them (paths relative to the repo root)."""
    script = root / "stages" / f"{stage}.py"
    if not script.exists():
        raise FileNotFoundError(f"dvc.yaml stage {stage!r} has no script {script}")
    src = root / "src"
    return ([f"stages/{stage}.py", STAGE_HELPER]
            + [path.relative_to(root).as_posix() for path in library_paths(script, src)])


def _is_code(dep) -> bool:
    return isinstance(dep, str) and (dep.startswith("stages/") or dep.startswith("src/"))


def updated_deps(deps: list, code: list[str]) -> list:
    """`deps` with its code entries replaced by `code`: the script and helper first, the data deps
    next in their order, the library files last."""
    others = [dep for dep in deps if not _is_code(dep)]
    return code[:2] + others + code[2:]


def _load(dvc_yaml: Path):
    yaml = YAML()          # round-trip: comments and layout survive
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    return yaml, yaml.load(dvc_yaml.read_text())


def stale_stages(root: Path = Path(".")) -> dict[str, list[str]]:
    """Stage name -> the code deps it should list, for every stage whose list differs."""
    _, document = _load(root / "dvc.yaml")
    stale = {}
    for stage, definition in document["stages"].items():
        deps = list(definition.get("deps") or [])
        wanted = updated_deps(deps, code_deps(stage, root))
        if [str(dep) for dep in deps] != wanted:
            stale[stage] = wanted
    return stale


def write(root: Path = Path(".")) -> list[str]:
    """Rewrite the stale code deps in dvc.yaml; returns the stages changed."""
    from cifarlab.atomic import atomic_path

    stale = stale_stages(root)
    if stale:
        yaml, document = _load(root / "dvc.yaml")
        for stage, wanted in stale.items():
            deps = document["stages"][stage]["deps"]
            # a comment on a data dep (ruamel keeps it by position) moves with its entry
            comments = {str(dep): deps.ca.items.get(i) for i, dep in enumerate(deps) if not _is_code(dep)}
            deps.clear()
            deps.ca.items.clear()
            deps.extend(wanted)
            for i, dep in enumerate(wanted):
                if comments.get(dep) is not None:
                    deps.ca.items[i] = comments[dep]
        with atomic_path(root / "dvc.yaml") as tmp, open(tmp, "w") as out:
            yaml.dump(document, out)
    return sorted(stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifarlab codedeps", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if dvc.yaml is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stages()
        for stage, wanted in stale.items():
            print(f"dvc.yaml: stage {stage} code deps are stale; should be {', '.join(w for w in wanted if _is_code(w))}; "
                  f"run `python -m cifarlab codedeps`", file=sys.stderr)
        return 1 if stale else 0
    changed = write()
    print(f"dvc.yaml: code deps updated for {', '.join(changed)}" if changed else "dvc.yaml: code deps up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
