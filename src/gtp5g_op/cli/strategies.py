"""``gtp5g-op strategies``: list, push, delete and prune Gthulhu scheduling strategies."""

from __future__ import annotations

import json
import logging
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from gtp5g_op.cli.common import API, GLOBAL, STATE_DIR, api_flags, setup_logs, shared_options, shared_values
from gtp5g_op.cli.output import text
from gtp5g_op.config import Settings, format_duration_ns, load_settings
from gtp5g_op.errors import cli_errors
from gtp5g_op.gthulhu import sync
from gtp5g_op.gthulhu.ownership import OwnershipStore
from gtp5g_op.ops.statedir import StateDirError


def _settings(ctx: click.Context, **flags: Any) -> Settings:
    setup_logs(ctx)
    given = shared_values(ctx)
    return load_settings(given.get("config"), **api_flags(ctx), state_dir=given.get("state_dir"), **flags)


def _store(settings: Settings) -> OwnershipStore:
    """The ownership file; an unusable state directory is an error now, before the API is changed."""
    store = OwnershipStore(settings.api_url, settings.state_dir)
    store.dir.ensure()
    return store


def _emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


@click.group()
@shared_options(*GLOBAL, *API, STATE_DIR)
def strategies() -> None:
    """Show and change the scheduling strategies held by the Gthulhu API.

    A POST to the API replaces its whole set, so push/delete/prune read the set first and keep what
    they do not touch. PIDs this tool pushed are remembered in an ownership file (docs/api.md).

    \b
    Examples:
      gtp5g-op strategies --public-key /etc/gthulhu/jwt.pub list
      gtp5g-op strategies list --json
      gtp5g-op strategies push --pid 4242 --execution-time 10ms
      gtp5g-op strategies delete --pid 4242
      gtp5g-op strategies prune          # remove only what gtp5g-op put there
    """


@strategies.command("list")
@shared_options(*GLOBAL, *API, STATE_DIR)
@click.option("--json", "as_json", is_flag=True, help="Print the server's list as JSON.")
@click.pass_context
@cli_errors
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the server's strategies with the comm and state of each PID on this host.

    \b
    Examples:
      gtp5g-op strategies list
      gtp5g-op strategies list --json | jq '.[].pid'
    """
    settings = _settings(ctx)
    with sync.make_client(settings) as client:
        entries = client.list_strategies()
    if as_json:
        _emit_json(entries)
        return
    try:
        owners = _store(settings).load()
    except StateDirError as exc:  # listing needs no state: say who owns what as far as is known
        logging.getLogger(__name__).warning("owners unknown: %s", exc.one_line())
        owners = {}
    rows = sync.describe(entries, owners)
    table = Table(title=text(f"Gthulhu strategies at {settings.api_url}"))
    for name in ("PID", "comm", "state", "priority", "exec time", "selectors", "command regex", "owner"):
        table.add_column(name, justify="right" if name == "PID" else "left")
    for row in rows:  # the server's strings and comms are shown as text, never as rich markup
        table.add_row(*(text(cell) for cell in (
            str(row["pid"] or "-"),
            row["comm"] or "-",
            row["state"] or "not here",
            str(row["priority"]).lower(),
            row["execution_time_human"] or "-",
            row["selectors"] or "-",
            row["command_regex"] or "-",
            row["owner"],
        )))
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console.width = max(console.width, 120)
    console.print(table)
    if not rows:
        click.echo("no strategies")


@strategies.command("push")
@shared_options(*GLOBAL, *API, STATE_DIR)
@click.option("--pid", "pids", type=click.IntRange(min=1), multiple=True, required=True, help="Thread id to favour (repeatable).")
@click.option("--priority/--no-priority", default=None, help="Run before others [config policy.priority; default true].")
@click.option("--execution-time", help="Time slice: 20ms, 1.5s, 500us or ns [config policy.execution_time; default 20ms].")
@click.option("--replace", is_flag=True, help="Replace the whole set instead of keeping other entries.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@cli_errors
def push_cmd(ctx: click.Context, pids: tuple[int, ...], priority: bool | None, execution_time: str | None, replace: bool, as_json: bool) -> None:
    """Add or update strategies for PIDs, keeping every other entry unless --replace.

    \b
    Examples:
      gtp5g-op strategies push --pid 4242
      gtp5g-op strategies push --pid 4242 --pid 4243 --no-priority --execution-time 5ms
    """
    settings = _settings(ctx, priority=priority, execution_time=execution_time)
    policy = settings.policy
    with sync.make_client(settings) as client:
        result = sync.push_pids(
            client, pids, policy.priority, policy.execution_time_ns, _store(settings),
            replace_all=replace, known_selectors=settings.known_selectors,
        )
    doc = {
        "pushed": [sync.strategy_for(p, policy.priority, policy.execution_time_ns) for p in sorted(set(pids))],
        "kept_selector_strategies": result.selector_strategies,
        "kept_foreign_pids": result.foreign_pids,
        "total": len(result.body),
    }
    if as_json:
        _emit_json(doc)
    else:
        click.echo(
            f"pushed {len(doc['pushed'])} strateg{'y' if len(doc['pushed']) == 1 else 'ies'} "
            f"(priority {str(policy.priority).lower()}, {format_duration_ns(policy.execution_time_ns)}); "
            f"kept {result.selector_strategies} selector and {len(result.foreign_pids)} other PID strateg"
            f"{'y' if result.selector_strategies + len(result.foreign_pids) == 1 else 'ies'}"
        )


@strategies.command("delete")
@shared_options(*GLOBAL, *API, STATE_DIR)
@click.option("--pid", "pids", type=click.IntRange(min=1), multiple=True, required=True, help="PID whose strategy to remove (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the removed PIDs as JSON.")
@click.pass_context
@cli_errors
def delete_cmd(ctx: click.Context, pids: tuple[int, ...], as_json: bool) -> None:
    """Remove the PID strategies for PIDs (whoever pushed them); keep everything else.

    \b
    Examples:
      gtp5g-op strategies delete --pid 4242
    """
    settings = _settings(ctx)
    with sync.make_client(settings) as client:
        removed = sync.delete_pids(client, pids, _store(settings), settings.known_selectors)
    if as_json:
        _emit_json({"removed": removed})
    else:
        click.echo(f"removed the strategies of PID {', '.join(map(str, removed))}")


@strategies.command("prune")
@shared_options(*GLOBAL, *API, STATE_DIR)
@click.option("--json", "as_json", is_flag=True, help="Print the removed PIDs as JSON.")
@click.pass_context
@cli_errors
def prune_cmd(ctx: click.Context, as_json: bool) -> None:
    """Remove only the strategies gtp5g-op put there (by watch or push); keep all others.

    \b
    Examples:
      gtp5g-op strategies prune
      gtp5g-op strategies --api-url http://gthulhu-api:80 prune --json
    """
    settings = _settings(ctx)
    with sync.make_client(settings) as client:
        removed = sync.prune(client, _store(settings), settings.known_selectors)
    if as_json:
        _emit_json({"removed": removed})
    elif removed:
        click.echo(f"removed the strategies gtp5g-op put there: PID {', '.join(map(str, removed))}")
    else:
        click.echo("nothing to remove: no strategy on the server was put there by gtp5g-op")
