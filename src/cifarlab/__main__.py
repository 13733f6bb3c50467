"""`python -m cifarlab <tool> [args]`: the one front door to the library's commands.

Documented commands name a tool here, not a module, so they stay the same when a module moves.
`python -m cifarlab <tool> --help` prints that tool's options.
"""

from __future__ import annotations

import importlib
import sys

# tool -> (the module whose main(argv) runs it, or `module:function`, what it does)
TOOLS = {
    "compose": ("cifarlab.config.compose", "write params.yaml from conf/ (the composition `dvc exp run` makes)"),
    "preset-table": ("cifarlab.config.preset_table", "regenerate the README's preset table from conf/preset/"),
    "codedeps": ("cifarlab.tools.codedeps", "regenerate (or --check) dvc.yaml's code deps from the imports"),
    "compare": ("cifarlab.tools.compare", "finished experiments grouped by preset: test accuracy, mean and spread"),
    "sweep": ("cifarlab.tools.sweep", "run a sweep as SLURM array jobs, one `dvc exp run` each; collect and compare"),
    "exps": ("cifarlab.tools.experiments", "the experiments as a table that fits a terminal, best first"),
    "queue": ("cifarlab.tools.queue", "queued experiments left Running by a dead worker: list, --clean, --requeue"),
    "check": ("cifarlab.config.overrides", "check `-S` overrides as `dvc exp run` would compose them (did-you-mean)"),
    "run": ("cifarlab.config.overrides:run_main", "check the `-S` overrides, then `dvc exp run` the same arguments"),
    "models": ("cifarlab.models.registry", "list the registered networks with their parameter counts"),
    "predict": ("cifarlab.tools.predict", "classify image files or folders with a trained model (or an experiment's)"),
    "export": ("cifarlab.tools.export", "export a trained model to TorchScript and ONNX, its input convention inside"),
}


def usage() -> str:
    width = max(map(len, TOOLS))
    return "usage: python -m cifarlab <tool> [args]\n\ntools:\n" + "\n".join(
        f"  {name:{width}}  {what}" for name, (_, what) in TOOLS.items())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in TOOLS:
        print(f"python -m cifarlab: unknown tool {argv[0]!r}; allowed: {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    module, _, function = TOOLS[argv[0]][0].partition(":")
    return getattr(importlib.import_module(module), function or "main")(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
