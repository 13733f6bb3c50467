"""What notebooks/quickstart.ipynb runs, so that its cells stay a few lines each.

`setup` runs before the pipeline's requirements are installed: this module imports only the standard
library and `packaging` at the top, and IPython only where it displays something.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterable, Optional

DVC = [sys.executable, "-m", "dvc"]
DATA_CHOICES = ("cifar10", "synthetic")
REPORT = Path("reports/report.md")
REPORT_FIRST_SCREEN = 2          # the report's sections shown in the notebook (the rest is linked)
IMAGE_LINK = r"!\[[^\]]*\]\(([^)\s]+\.png)\)"


def sh(*args) -> None:
    """Run a command, showing each line it prints once it is complete: a progress bar's updates (its
    carriage-return redraws) collapse into its last state, so a page rendered later holds one line
    per bar, not one per update. Stops the notebook when the command fails."""
    args = [str(a) for a in args]
    print("$", " ".join(args), flush=True)
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in summarised(iter(lambda: process.stdout.read1(4096), b"")):
        print(line, flush=True)
    if process.wait() != 0:
        raise RuntimeError(f"`{' '.join(args)}` exited with {process.returncode}: see its output above")


def summarised(chunks: Iterable[bytes]) -> Iterable[str]:
    """The complete lines of a byte stream, each as its last carriage-return redraw left it."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").rsplit(b"\r", 1)[-1].decode(errors="replace")
    if pending:
        yield pending.rsplit(b"\r", 1)[-1].decode(errors="replace")


def output(*args) -> str:
    """A command's standard output (its error output is shown if it fails)."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(map(str, args))}` exited with {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def unmet(requirements: str | Path = "requirements.txt") -> list[str]:
    """The lines of requirements.txt (the runtime's; never the test toolchain of requirements-dev.txt)
    that the installed packages do not satisfy."""
    from packaging.requirements import Requirement

    lines = []
    for line in Path(requirements).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement = Requirement(line)
        try:
            if not requirement.specifier.contains(version(requirement.name), prereleases=True):
                lines.append(line)
        except PackageNotFoundError:
            lines.append(line)
    return lines


def allowed(group: str) -> list[str]:
    """The names a choice may take: the files of conf/<group>/."""
    return sorted(path.stem for path in Path("conf", group).glob("*.yaml"))


def check_choices(preset: str, compare_with: str, budget: str, data: str) -> None:
    for choice, value, group in (("PRESET", preset, "preset"), ("COMPARE_WITH", compare_with, "preset"),
                                 ("BUDGET", budget, "budget")):
        if value not in allowed(group):
            raise ValueError(f"{choice} is {value!r}; allowed: {', '.join(allowed(group))} (the files of conf/{group}/)")
    if data not in DATA_CHOICES:
        raise ValueError(f"DATA is {data!r}; allowed: {', '.join(DATA_CHOICES)}")


def official_url(config: Path = Path("conf/config.yaml")) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["data"]["url"]


def reachable(url: str, timeout: float = 5.0) -> Optional[str]:
    """None when `url` answers, else why not (one phrase)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except Exception as err:   # noqa: BLE001  (any failure means: not from here)
        return str(getattr(err, "reason", err)) or type(err).__name__


def data_source(data: str, url: Optional[str] = None) -> str:
    """`data`, or `synthetic` with one line when CIFAR-10 cannot be downloaded from here."""
    if data != "cifar10":
        return data
    url = url or official_url()
    why = reachable(url)
    if why is None:
        return data
    print(f"CIFAR-10 cannot be downloaded from {url} ({why}): using the synthetic set instead (DATA = \"synthetic\")")
    return "synthetic"


def setup(preset: str, compare_with: str, budget: str, data: str) -> str:
    """Install the missing runtime requirements, give the clone a git identity if it has none (DVC records
    each experiment as a commit), check the choices, and return the data source to use."""
    missing = unmet()
    if missing:
        sh(sys.executable, "-m", "pip", "install", "-q", *missing)
    else:
        print("every requirement is installed")
    if subprocess.run(["git", "config", "user.email"], capture_output=True).returncode != 0:
        sh("git", "config", "user.name", "cifarlab notebook")
        sh("git", "config", "user.email", "notebook@example.com")
    check_choices(preset, compare_with, budget, data)
    return data_source(data)


def run_assignment(preset: str, budget: str, data: str) -> str:
    """`dvc exp run` of `preset` as the experiment `<preset>-<budget>-<data>` (replacing one of that name)."""
    name = f"{preset}-{budget}-{data}"
    if name in output(*DVC, "exp", "list", "--name-only").split():
        sh(*DVC, "exp", "remove", name)
    sh(*DVC, "exp", "run", "-n", name, "-S", f"preset={preset}", "-S", f"budget={budget}", "-S", f"data.source={data}")
    return name


NOTEBOOK_WIDTH = 140   # a notebook's output is wider than a terminal: the experiment names stay whole


def experiments_text(width: int = NOTEBOOK_WIDTH) -> str:
    return output(sys.executable, "-m", "cifarlab", "exps", "--width", width)


def embed_images(text: str, folder: Path, pattern: str = IMAGE_LINK) -> str:
    """`text` with every PNG that `pattern` finds (group 1: its path relative to `folder`) inlined as
    data, so the page shows its figures wherever the notebook runs (Colab serves no local files)."""
    def inline(match):
        path = folder / match.group(1)
        if not path.is_file():
            return match.group(0)
        data = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        return match.group(0).replace(match.group(1), data)
    return re.sub(pattern, inline, text)


def first_screen(report: str, sections: int = REPORT_FIRST_SCREEN) -> str:
    """The report up to the end of its first `sections` `## ` sections, and a line naming the rest."""
    starts = [m.start() for m in re.finditer(r"^## ", report, flags=re.MULTILINE)]
    if len(starts) <= sections:
        return report
    rest = re.findall(r"^## (.+)$", report[starts[sections]:], flags=re.MULTILINE)
    return (report[:starts[sections]].rstrip() + f"\n\n*The rest of the report ({', '.join(rest)}) is in "
            f"[{REPORT}](../{REPORT}).*\n")


def show_results() -> None:
    """The experiments table, the training curves, the confusion matrix and the report's first screen."""
    from IPython.display import Image, Markdown, display

    display(Markdown(f"```\n{experiments_text()}\n```"))
    display(Markdown("### Training curves"), Image("reports/figures/curves.png"))
    display(Markdown("### Confusion matrix (test split)"), Image("plots/confusion.png"))
    display(Markdown(embed_images(first_screen(REPORT.read_text()), REPORT.parent)))


def show_comparison(first: str, second: str, page_dir: Path = Path(".cache/plots_diff")) -> Path:
    """`dvc plots diff` of two experiments, written under a git- and DVC-ignored folder and shown inline."""
    import html

    from IPython.display import HTML, Markdown, display

    display(Markdown(f"```\n{experiments_text()}\n```"))
    sh(*DVC, "plots", "diff", first, second, "-o", page_dir)
    page = (page_dir / "index.html").resolve()
    print("the comparison page:", page)
    inlined = embed_images(page.read_text(), page_dir, r'src="(static/[^"]+\.png)"')
    display(HTML(f'<iframe srcdoc="{html.escape(inlined)}" style="width: 100%; height: 900px; border: 0"></iframe>'))
    return page
