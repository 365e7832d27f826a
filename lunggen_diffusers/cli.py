"""What every command shares, so all of them fail alike:

- an unknown flag or a value of the wrong type: argparse's own message and usage, exit status 2;
- a bad value or a missing path found later: a `UsageError`, printed as one `error: ...` line naming the option,
  exit status 2;
- never a traceback for a user's mistake, and always one for anything else (a bug, even a ValueError).

Light on purpose (transformers is imported when a parser is built): the reader study's server starts from here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeVar

if TYPE_CHECKING:
    from transformers import HfArgumentParser

T = TypeVar("T")


class UsageError(ValueError):
    """A deliberate refusal of a user's input (a flag, a path, data, a launch, a Hub login), raised only where the code
    checks that input. A ValueError, so library callers that catch those still do."""


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse(parser: HfArgumentParser, argv: Sequence[str] | None = None) -> tuple:
    """The parser's dataclasses from `argv`; a flag no dataclass has is argparse's error (usage, exit 2), as with a
    plain ArgumentParser, rather than HfArgumentParser's ValueError."""
    *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return tuple(parsed)


def parse_args(types, argv: Sequence[str] | None = None, prog: str | None = None, **defaults) -> tuple:
    """`parse` with a new HfArgumentParser over `types` (one dataclass or several), `defaults` overriding theirs."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(types, prog=prog)
    parser.set_defaults(**defaults)
    return parse(parser, argv)


def listed(values: Sequence[str] | None, flag: str) -> list[str] | None:
    """A list option's values, given apart (`--findings Cardiomegaly Effusion`, as every command takes lists); the
    comma-separated form of before ("Cardiomegaly,Effusion") still works, with a one-line note."""
    if values is None or not any("," in value for value in values):
        return None if values is None else list(values)
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    print(f"note: --{flag} {' '.join(values)}: commas are deprecated; give the names apart: --{flag} "
          + " ".join(f'"{n}"' if " " in n else n for n in names), file=sys.stderr)
    return names


def run(main: Callable[[], T]) -> T:
    """Run a command's work; a refusal ends it with one line and exit status 2, anything else with its traceback."""
    try:
        return main()
    except UsageError as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
