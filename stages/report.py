"""report stage: reports/report.md from the other stages' outputs only."""

import _src  # noqa: F401  (this checkout's src/ first: see stages/_src.py)

from cifarlab.config.params import load_params
from cifarlab.errors import run_stage
from cifarlab.pipeline.report.document import build_report


def main() -> None:
    path = build_report(load_params().report)
    print(f"report: {path}")


if __name__ == "__main__":
    run_stage(main)
