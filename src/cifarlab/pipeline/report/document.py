"""reports/report.md, built only from what the other stages wrote.

The report in two steps, each in its own module: `summary.read_summary` reads every file the
report uses, once, into a `RunSummary`; `sections` turns it into markdown, one registered section
at a time. This module puts them together: the header, then every section under its heading, and
writes the markdown and its figures in one atomic step.
"""

from __future__ import annotations

from pathlib import Path

from cifarlab import paths
from cifarlab.atomic import atomic_dir
from cifarlab.config.params import ReportParams
from cifarlab.pipeline.report.sections import SECTIONS, header
from cifarlab.pipeline.report.summary import RunSummary, read_summary


def render(s: RunSummary, figures: Path) -> str:
    """The whole markdown: the header, then every section under its heading; figures go to `figures`."""
    parts = [header(s)]
    for part in SECTIONS:
        parts += [f"## {part.heading}", part.render(s, figures)]
    return "\n\n".join(parts) + "\n"


def build_report(params: ReportParams, out_dir: Path = paths.REPORT_DIR) -> Path:
    summary = read_summary(params)
    with atomic_dir(out_dir) as tmp:
        figures = tmp / "figures"
        figures.mkdir()
        (tmp / "report.md").write_text(render(summary, figures))
    return out_dir / "report.md"
