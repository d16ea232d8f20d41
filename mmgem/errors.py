"""User mistakes, told apart from bugs: the `mmgem` command prints the former as one line and exit status 2.

A user mistake is either an :class:`MMGEMUserError` raised anywhere, or a `ValueError` / `FileNotFoundError` (and
the other "bad path" errors) raised while the user's input is being checked, inside :func:`checking_user_input`.
The exception itself is not changed (library callers still catch `ValueError`); the block only marks it, so that a
`ValueError` from a bug deep inside a training run still shows its traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# Errors that mean "what you gave is wrong" when they come out of checking the user's options, paths and data.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)
_MARK = "_mmgem_user_error"
DEBUG_VARIABLE = "MMGEM_DEBUG"  # set by `mmgem --debug`: errors keep their traceback


class MMGEMUserError(ValueError):
    """A mistake in what the user gave (an option, a path, a data file): the message names it and what was expected."""


@contextmanager
def checking_user_input() -> Iterator[None]:
    """Mark the `ValueError`s / path errors raised inside the block as user mistakes (see the module docstring)."""
    try:
        yield
    except INPUT_ERRORS as error:
        setattr(error, _MARK, True)
        raise


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is a user mistake (to print as one line) rather than a failure with a traceback."""
    return isinstance(error, MMGEMUserError) or bool(getattr(error, _MARK, False))


def debug_requested() -> bool:
    """Whether errors should keep their traceback (`mmgem --debug ...` or `MMGEM_DEBUG=1`)."""
    return os.environ.get(DEBUG_VARIABLE, "").lower() in ("1", "true", "yes")


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (multi-line messages, such as lists of bad records, joined by "; ")."""
    lines = [line.strip().removeprefix("- ").strip() for line in str(error).splitlines()]
    text = "; ".join(line for line in lines if line)
    return text.replace(":;", ":") or type(error).__name__


__all__ = [
    "DEBUG_VARIABLE",
    "INPUT_ERRORS",
    "MMGEMUserError",
    "checking_user_input",
    "debug_requested",
    "is_user_error",
    "one_line",
]
