"""What every entry point shares: a user's mistake is one `error: ...` line and exit status 2, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError)


def run(main: Callable[[], T]) -> T:
    try:
        return main()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
