"""``doctor``: one screen that says whether this host is ready, with the fix for each gap."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gtp5g_op.cli.common import API, GLOBAL, api_flags, setup_logs, shared_options, shared_values
from gtp5g_op.cli.output import Col, fit_table, keys_fit, text
from gtp5g_op.cli.output import console as make_console
from gtp5g_op.config import load_settings
from gtp5g_op.errors import EXIT_FAIL, cli_errors
from gtp5g_op.ops import doctor as checks

_STYLE = {checks.OK: "green", checks.FAIL: "red", checks.WARN: "yellow", checks.UNKNOWN: "magenta"}


@click.command("doctor")
@shared_options(*GLOBAL, *API)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@cli_errors
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check this host: tracefs, BPF, kernel BTF, fentry, the gtp5g module (exports, BTF), its
    devices, clang/bpftool and the Gthulhu API. Exit code 0 only when every required check passes.

    \b
    Examples:
      gtp5g-op doctor
      gtp5g-op doctor --api-url http://10.0.0.5:8080
      gtp5g-op doctor --json | jq '.checks[] | select(.status != "ok")'
    """
    setup_logs(ctx)
    settings = load_settings(shared_values(ctx).get("config"), **api_flags(ctx))
    results = checks.run_checks(settings)
    ready = checks.all_ready(results)
    if as_json:
        click.echo(json.dumps({"ready": ready, "checks": [c.as_dict() for c in results]}))
    else:
        console = make_console()
        print_checks(results, console)
        click.echo("ready" if ready else "not ready: see each fix above")
    if not ready:
        sys.exit(EXIT_FAIL)


_COLS = [Col("check", key=True), Col("status", key=True, wrap=True), Col("detail", key=True, wrap=True)]


def _rows(results: list) -> list[list[Text]]:
    rows = []
    for c in results:
        status = Text(c.status, style=_STYLE[c.status])
        if not c.required:
            status.append(" (optional)", style="dim")
        detail = text(c.detail)
        if c.status != checks.OK and c.fix:
            detail.append("\nfix: ", style="bold").append_text(text(c.fix))
        rows.append([text(c.name), status, detail])
    return rows


def doctor_table(results: list, width: int) -> Table:
    """Check and status whole; the detail, then the fix, wrap between words."""
    return fit_table(Text("gtp5g-op doctor"), _COLS, _rows(results), width)


def print_checks(results: list, console: Console) -> None:
    """The table when every word of it fits the width; else one line per check (and one per fix), left to
    the terminal to wrap, so a URL or path too long for a column is never split by the table."""
    rows = _rows(results)
    if keys_fit(_COLS, rows, console.width):
        console.print(doctor_table(results, console.width))
        return
    console.print(Text("gtp5g-op doctor", style="italic"))
    for name, status, detail in rows:
        what, _, fix = detail.plain.partition("\nfix: ")
        console.print(Text.assemble(name, ": ", status, ": ", what), soft_wrap=True)
        if fix:
            console.print(Text.assemble("  ", ("fix: ", "bold"), fix), soft_wrap=True)
