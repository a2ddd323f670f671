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

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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
        text = " ".join(text.split()).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


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
