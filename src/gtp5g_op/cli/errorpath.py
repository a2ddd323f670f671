"""The one error path of the ``gtp5g-op`` command: every failure leaves as one line and an exit code.

``gtp5g-op: error: <what>; fix: <what to do>`` on stderr, for the project's own errors (``OpError``) and
for click's usage errors alike (no such option, missing argument, bad value ...: exit 2, the fix naming
``gtp5g-op <command> --help``). Ctrl-C exits 130 without a traceback; a closed stdout (``| head``) ends
quietly with 0 (the reader chose to stop). Anything else is a bug: one line saying so (exit 70, sysexits' EX_SOFTWARE), and the traceback
with ``-vv``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import traceback

import click

from gtp5g_op.errors import EXIT_USAGE, OpError

PROG = "gtp5g-op"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C
EXIT_BUG = 70  # EX_SOFTWARE (sysexits.h): an internal error

log = logging.getLogger(__name__)


def command_path(ctx: click.Context | None) -> str:
    """``gtp5g-op strategies list`` for a context, whatever name the program was started under
    (``python -m gtp5g_op``); a stand-alone command keeps its own name."""
    chain = []
    while ctx is not None:
        chain.append(ctx)
        ctx = ctx.parent
    if not chain:
        return PROG
    root = chain[-1]
    first = PROG if isinstance(root.command, OneErrorPath) else (root.info_name or PROG)
    return " ".join([first, *(c.info_name or "" for c in reversed(chain[:-1]))])


def _sentence(text: str) -> str:
    """click's capitalised, full-stopped message as a clause: ``No such option.`` -> ``no such option``."""
    text = " ".join(text.split()).rstrip(".")
    if text[:1].isupper() and not text[1:2].isupper():
        text = text[0].lower() + text[1:]
    return text


def usage_error(exc: click.UsageError) -> OpError:
    """A click usage error as an OpError with the fix (exit 2)."""
    cmd = command_path(exc.ctx)
    helps = f"`{cmd} --help` lists its options and examples"
    if isinstance(exc, click.NoSuchOption):
        hidden = {o for p in (exc.ctx.command.params if exc.ctx else []) if getattr(p, "hidden", False)
                  for o in p.opts}
        near = [p for p in (exc.possibilities or []) if p not in hidden]
        fix = f"did you mean {' or '.join(near)}? {helps}" if near else helps
        return OpError(f"`{cmd}` has no option {exc.option_name}", fix, EXIT_USAGE)
    message, _, fix = exc.format_message().partition("; fix: ")  # a parameter type may name its own fix
    message = _sentence(message)
    if re.match(r"no such command", message):
        return OpError(message, f"`{cmd} --help` lists the commands", EXIT_USAGE)
    return OpError(message, f"{_sentence(fix)}; {helps}" if fix else helps, EXIT_USAGE)


def print_error(err: OpError) -> None:
    """Print ``gtp5g-op: error: <message>; fix: <fix>`` on stderr."""
    click.echo(f"{PROG}: error: {err.one_line()}", err=True)


def report(exc: BaseException) -> int:
    """Print ``exc`` the one way and return the exit code."""
    if isinstance(exc, OpError):
        print_error(exc)
        return exc.exit_code
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        exc.show()  # a group run without a sub-command: its help
        return exc.exit_code
    if isinstance(exc, click.UsageError):
        err = usage_error(exc)
        print_error(err)
        return err.exit_code
    if isinstance(exc, click.ClickException):
        print_error(OpError(_sentence(exc.format_message()), "see the message", exc.exit_code))
        return exc.exit_code
    if isinstance(exc, (KeyboardInterrupt, click.Abort)):
        return EXIT_INTERRUPTED
    if isinstance(exc, (_ReaderGone, BrokenPipeError)):
        _silence_stdout()
        return 0
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        traceback.print_exception(exc)
    print_error(OpError(f"unexpected {type(exc).__name__}: {exc}",
                        "this is a bug in gtp5g-op: rerun with -vv for the traceback and report it", EXIT_BUG))
    return EXIT_BUG


def _silence_stdout() -> None:
    """The reader of stdout went away: drop what is still buffered instead of failing again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (CliRunner): nothing to silence
        pass


def run(command: click.Command, args: list[str] | None = None) -> None:
    """Run a stand-alone click command (``python -m gtp5g_op.kernel.workload``) with this error path."""
    try:
        result = command.main(args, standalone_mode=False)
    except BaseException as exc:  # noqa: BLE001 - as OneErrorPath.main
        if isinstance(exc, SystemExit):
            raise
        sys.exit(report(exc))
    sys.exit(result if isinstance(result, int) else 0)


class _ReaderGone(Exception):
    """stdout's reader went away (EPIPE); raised past click, whose own handling would exit 1."""


class OneErrorPath(click.Group):
    """A click group whose ``main`` reports every failure through :func:`report`."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise _ReaderGone() from exc
            raise

    def make_context(self, *args, **kwargs) -> click.Context:  # type: ignore[override]
        try:  # the top group's --help and --version print while its context is made
            return super().make_context(*args, **kwargs)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise _ReaderGone() from exc
            raise

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name or PROG, complete_var, standalone_mode=False, **extra)
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - the one place that turns anything into one line
            sys.exit(report(exc))
        sys.exit(result if isinstance(result, int) else 0)
