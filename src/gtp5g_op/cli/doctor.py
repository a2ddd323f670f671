"""``doctor``: one screen that says whether this host is ready, with the fix for each gap."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from gtp5g_op.cli.common import API, GLOBAL, api_flags, setup_logs, shared_options, shared_values
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
        table = Table(title="gtp5g-op doctor")
        for col in ("check", "status", "detail", "fix"):
            table.add_column(col, overflow="fold")
        for c in results:
            status = c.status if c.required else f"{c.status} (optional)"
            fix = "" if c.status == checks.OK else c.fix
            table.add_row(c.name, f"[{_STYLE[c.status]}]{status}[/]", c.detail, fix)
        Console().print(table)
        click.echo("ready" if ready else "not ready: see the fix column")
    if not ready:
        sys.exit(EXIT_FAIL)
