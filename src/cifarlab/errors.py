"""The one exception type that means "the user's input is wrong", and how stages report it."""

from __future__ import annotations

import sys
from typing import Callable


class CifarlabError(Exception):
    """A problem the user can fix (bad params, bad download, missing stage output).

    Stage scripts print its message as one line and exit non-zero; anything else is a bug
    and keeps its traceback.
    """

    exit_code = 1


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`, turning a CifarlabError into a one-line message and a non-zero exit."""
    try:
        main()
    except CifarlabError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
