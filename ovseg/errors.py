"""Errors of the user's making, and how the ``ovseg`` command reports them.

Raise :class:`UserError` where a wrong config, data file, checkpoint or missing resource is
detected, with a message that names the file or key and says what to do. ``ovseg`` prints such an
error as one line ``ovseg: error: MESSAGE`` on stderr and exits with status 2, also when Lightning
or jsonargparse wrapped it in another exception; every other exception is a bug and keeps its
traceback. ``--debug`` (anywhere on the command line) or ``OVSEG_DEBUG=1`` shows the full
traceback of user errors too.

This module imports nothing heavy: the command's error path must not depend on torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

#: exit status of a user error (the one argparse uses for command-line errors)
USER_ERROR_STATUS = 2
DEBUG_ENV = "OVSEG_DEBUG"


class UserError(ValueError):
    """A configuration, data, checkpoint or resource problem the user can fix; the message says how.

    A ``ValueError`` so that callers catching the errors of a validation keep working.
    """


class MissingResourceError(UserError, LookupError):
    """A resource that is not installed (NLTK data, weights); the message says how to get it.

    Also a ``LookupError``, the type NLTK and Hugging Face raise for a missing resource.
    """


#: standard exceptions that, reaching the command, are always about the user's files
_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def debug_requested(argv: list[str] | None = None) -> bool:
    """``--debug`` on the command line or ``OVSEG_DEBUG`` set to a non-empty value other than 0."""
    return (argv is not None and "--debug" in argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then its causes and contexts (what wrapped it hides inside), without cycles."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def user_error_in(error: BaseException) -> BaseException | None:
    """The :class:`UserError` (or missing/unreadable file error) that caused ``error``, if any."""
    for link in _chain(error):
        if isinstance(link, UserError):
            return link
    for link in _chain(error):
        if isinstance(link, _FILE_ERRORS):
            return link
    return None


def one_line(error: BaseException) -> str:
    """The error's message for ``ovseg: error: ...``: its text, or for a file error the file's name."""
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in str(error.args):
        return f"{error.strerror or type(error).__name__}: {error.filename}"
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return text.strip() or type(error).__name__
