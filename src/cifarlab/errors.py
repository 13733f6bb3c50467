"""The one exception type that means "the user's input is wrong", and how stages report it."""

from __future__ import annotations

import sys
from typing import Callable


class CifarlabError(Exception):
    """A problem the user can fix (bad params, bad download, missing stage output).

    Stage scripts print its message as one line and exit non-zero; anything else is a bug
    and keeps its traceback.
    """


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`, turning a CifarlabError into a one-line message and exit code 1."""
    try:
        main()
    except CifarlabError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
