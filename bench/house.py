"""The library's shape in figures: modules per wing, the largest module, the longest functions, and
the imports that run back up the wings' order or close a circle.

    python bench/house.py            # print the figures
    python bench/house.py --check    # exit 1 naming each rule the house breaks (tests/test_house.py runs it)

The wings, from the bottom: the root's shared helpers, `models` (pure networks), `config`, `data`,
`engine`, `pipeline`, `tools`. A module may import its own wing and the wings below it, never one
above; `cifarlab/__main__.py` (the front door) is on top.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from cifarlab.tools.codedeps import imported_names, module_path  # noqa: E402

PACKAGE = "cifarlab"
WINGS = ("", "models", "config", "data", "engine", "pipeline", "tools")   # bottom to top; "" is the root
FRONT_DOOR = "__main__"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = {"pipeline/train.py": 60}


def modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the library."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def wing_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 else ""


def rank(name: str) -> int:
    return len(WINGS) if name.split(".")[-1] == FRONT_DOOR and name.count(".") == 1 else WINGS.index(wing_of(name))


def imports(path: Path, src: Path, name_of: dict[Path, str]) -> set[str]:
    """The library modules `path` imports, resolved as the stages' code deps are (`codedeps.module_path`)."""
    found = {module_path(name, src) for name in imported_names(ast.parse(path.read_text()))} - {None}
    return {name_of[file] for file in found}


def graph(src: Path = SRC) -> dict[str, set[str]]:
    known = modules(src)
    name_of = {path: name for name, path in known.items()}
    return {name: imports(path, src, name_of) - {name} for name, path in known.items()}


def back_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in edges.items() for b in targets if rank(b) > rank(a))


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the modules on it (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def functions(path: Path) -> list[tuple[int, str]]:
    """(lines, name) of every function and method in `path`, longest first."""
    tree = ast.parse(path.read_text())
    return sorted(((node.end_lineno - node.lineno + 1, node.name) for node in ast.walk(tree)
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))), reverse=True)


def figures(src: Path = SRC) -> dict:
    known = modules(src)
    edges = graph(src)
    lines = {name: len(path.read_text().splitlines()) for name, path in known.items()}
    longest = max(((n, f, name) for name, path in known.items() for n, f in functions(path)[:1]))
    largest = max(lines, key=lines.get)
    return {
        "modules per wing": dict(Counter(wing_of(name) or "(root)" for name in known
                                         if not known[name].name == "__init__.py")),
        "library lines": sum(lines.values()),
        "largest module": (largest, lines[largest]),
        "longest function": (f"{longest[2]}.{longest[1]}", longest[0]),
        "imports running back up": back_imports(edges),
        "circles": circles(edges),
    }


def problems(src: Path = SRC, function_limits: dict[str, int] = MAX_FUNCTION_LINES) -> list[str]:
    known = modules(src)
    out = [f"{a} imports {b}, a wing above it" for a, b in back_imports(graph(src))]
    out += ["import circle: " + " -> ".join(c) for c in circles(graph(src))]
    for name, path in known.items():
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            out.append(f"{path.relative_to(src)} has {n} lines (at most {MAX_MODULE_LINES})")
        if path.name == "__init__.py" and wing_of(name + ".x") and path.read_text().strip():
            out.append(f"{path.relative_to(src)} is not empty (a wing's marker holds no code)")
    for rel, limit in function_limits.items():
        for n, function in functions(src / PACKAGE / rel):
            if n > limit:
                out.append(f"{rel}: {function} has {n} lines (at most {limit})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 naming each broken rule")
    args = parser.parse_args(argv)
    if args.check:
        broken = problems()
        for line in broken:
            print(line, file=sys.stderr)
        return 1 if broken else 0
    for key, value in figures().items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
