"""Errors that reach the user as one line with the fix, and the exit codes they map to."""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable, TypeVar

import click

# Exit codes shared by every command.
EXIT_OK = 0
EXIT_FAIL = 1  # the command ran and the answer is "no" (check failed, push failed, ...)
EXIT_USAGE = 2  # bad flags or input (click uses 2 too)
EXIT_ENV = 3  # the host lacks something (tracefs, permission, tool, module)
EXIT_API = 4  # the Gthulhu API refused or could not be reached


# What must not reach a terminal or a line-oriented log raw: C0 controls (newline, CR, ESC, ...), DEL, C1
# controls, Unicode line/paragraph separators and bidi controls (they reorder what follows), and lone
# surrogates (undecodable bytes of a comm or path, which would also break the stream's UTF-8 encoder).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                     "\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    code = ord(c)
    if c in _NAMED:
        return _NAMED[c]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """``text`` as one visible line: control characters become escapes (``\\n``, ``\\x1b``, ``\\u202e``).

    A path, comm or server message passed through it cannot start a fake log line, move the cursor,
    change colours or reorder the rest of the line. Backslashes are left alone.
    """
    return _UNSAFE.sub(_escape, text)


class OpError(Exception):
    """A failure the user can fix: ``message`` says what went wrong, ``fix`` what to do."""

    exit_code = EXIT_FAIL

    def __init__(self, message: str, fix: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix
        if exit_code is not None:
            self.exit_code = exit_code

    def one_line(self) -> str:
        """The error as printed: ``message; fix: ...`` on a single line.

        Whitespace runs (newlines included) become one space; other control characters and bytes that are
        not UTF-8 (a path or a comm can hold any) are shown as ``\\xNN``, so nothing reaches the terminal raw.
        """
        text = self.message if not self.fix else f"{self.message}; fix: {self.fix}"
        return escape_control(" ".join(text.split()))  # whitespace runs (newlines too) become one space


class UsageError(OpError):
    exit_code = EXIT_USAGE


class EnvironmentProblem(OpError):
    exit_code = EXIT_ENV


class ApiError(OpError):
    exit_code = EXIT_API


F = TypeVar("F", bound=Callable)


def cli_errors(func: F) -> F:
    """Decorate a click command so an OpError prints one line on stderr and exits with its code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except OpError as exc:
            click.echo(f"gtp5g-op: error: {exc.one_line()}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]
