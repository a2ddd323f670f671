"""``gtp5g-op strategies``: list, push, delete and prune what gtp5g-op holds on the Gthulhu API.

Against a legacy API these are PID strategies; against a Gthulhu v1.x Manager, node scheduling
policies by comm (``--comm``). The work is done by :mod:`gtp5g_op.gthulhu.legacy` and
:mod:`gtp5g_op.gthulhu.manager`; this module parses options and prints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from gtp5g_op.cli.common import API, GLOBAL, STATE_DIR, api_flags, setup_logs, shared_options, shared_values
from gtp5g_op.cli.output import Col, console, fit_table, text
from gtp5g_op.config import Settings, format_duration_ns, load_settings
from gtp5g_op.errors import UsageError, cli_errors, escape_control
from gtp5g_op.gthulhu import factory, legacy, manager
from gtp5g_op.gthulhu.detect import MANAGER
from gtp5g_op.gthulhu.ownership import OwnershipStore
from gtp5g_op.ops.statedir import StateDirError

log = logging.getLogger(__name__)

PID_MAX_FILE = Path("/proc/sys/kernel/pid_max")
PID_MAX_LIMIT = 4194304  # the kernel's PID_MAX_LIMIT on 64-bit


def _settings(ctx: click.Context, **flags: Any) -> Settings:
    setup_logs(ctx)
    given = shared_values(ctx)
    return load_settings(given.get("config"), **api_flags(ctx), state_dir=given.get("state_dir"), **flags)


def _store(settings: Settings, writing: bool = True) -> OwnershipStore:
    """The ownership file; when ``writing``, a state directory that cannot keep it (unsafe, read-only,
    full) is an error now, before the API is changed."""
    store = OwnershipStore(settings.api_url, settings.state_dir)
    if writing:
        store.check_writable()
    else:
        store.dir.ensure()
    return store


def _emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def _say(message: str) -> None:
    """Print one line for people; comms and names from the server or the command line may hold control
    characters (ESC sequences, newlines): they are shown escaped, never sent to the terminal."""
    click.echo(escape_control(message))


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def pid_max() -> int:
    """This kernel's largest PID plus one (/proc/sys/kernel/pid_max)."""
    try:
        return int(PID_MAX_FILE.read_text().strip())
    except (OSError, ValueError):
        return PID_MAX_LIMIT


def _check_pids(pids: tuple[int, ...]) -> None:
    limit = pid_max()
    above = sorted(p for p in pids if p >= limit)
    if above:
        raise UsageError(f"PID {', '.join(map(str, above))} is above this kernel's pid_max ({limit - 1}): no such thread can exist",
                         "give a thread id as `ps -eLo tid,comm` shows it")


def _need_targets(pids: tuple[int, ...], comms: tuple[str, ...]) -> None:
    """--pid or --comm, checked before anything is contacted."""
    if not pids and not comms:
        raise UsageError("missing option '--pid' (legacy API) or '--comm' (Gthulhu v1.x Manager)",
                         "give --pid N for a legacy API or --comm NAME for a Manager (see --help)")
    bad = [c for c in comms if not manager.usable_comm(c)]
    if bad:
        raise UsageError(f"comm {bad[0]!r} cannot be matched exactly (1 to {manager.COMM_MAX_BYTES} bytes of UTF-8)",
                         "give the comm as /proc/<pid>/comm shows it")
    if pids:
        _check_pids(pids)


def _print(con: Console, table: Table, empty: str | None = None) -> None:
    con.print(table)
    if empty:
        con.print(text(empty))


@click.group()
@shared_options(*GLOBAL, *API, STATE_DIR)
def strategies() -> None:
    """Show and change what gtp5g-op holds on the Gthulhu API.

    A legacy API holds PID strategies (a POST replaces its whole set, so push/delete/prune read it first
    and keep what they do not touch; PIDs gtp5g-op pushed are remembered in an ownership file). A
    Gthulhu v1.x Manager holds node scheduling policies that boost by comm: there push and delete take
    --comm, and only this user's policies are seen. --api picks the generation (auto by default).

    \b
    Examples:
      gtp5g-op strategies --public-key /etc/gthulhu/jwt.pub list
      gtp5g-op strategies list --json
      gtp5g-op strategies push --pid 4242 --execution-time 10ms
      gtp5g-op strategies delete --pid 4242
      gtp5g-op strategies prune          # remove only what gtp5g-op put there
      gtp5g-op strategies --api-url http://gthulhu-manager:8080 --username ops list  # GTP5G_OP_PASSWORD set
      gtp5g-op strategies push --comm nr-gnb --node-name upf-1
    """


@strategies.command("list")
@shared_options(*GLOBAL, *API, STATE_DIR)
@click.option("--json", "as_json", is_flag=True, help="Print the server's list as JSON.")
@click.pass_context
@cli_errors
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the server's strategies (legacy: with the comm and state of each PID on this host) or this
    user's node policies (Manager: with, given --dm-url, the PIDs the node's Decision Maker boosts).

    \b
    Examples:
      gtp5g-op strategies list
      gtp5g-op strategies list --json | jq '.[].pid'
      gtp5g-op strategies list --api manager --username ops --dm-url http://10.0.0.7:8080
    """
    settings = _settings(ctx)
    if factory.resolve_kind(settings) == MANAGER:
        _list_manager(settings, as_json)
        return
    factory.require_credentials(settings, "legacy")
    with factory.legacy_client(settings) as client:
        entries = client.list_strategies()
    if as_json:
        _emit_json(entries)
        return
    try:
        owners = _store(settings, writing=False).load()
    except StateDirError as exc:  # listing needs no state: say who owns what as far as is known
        log.warning("owners unknown: %s", exc.one_line())
        owners = {}
    rows = legacy.describe(entries, owners)
    cells = [[str(r["pid"] or "-"), r["comm"] or "-", r["state"] or "not here", str(r["priority"]).lower(),
              r["execution_time_human"] or "-", r["selectors"] or "-", r["command_regex"] or "-", r["owner"]] for r in rows]
    columns = [Col("PID", "right", key=True), Col("comm", key=True), Col("state", min=8, drop=4),
               Col("priority", min=8, drop=2), Col("exec time", min=5, drop=1), Col("selectors", min=12, drop=3),
               Col("command regex", min=8, drop=5), Col("owner", key=True)]
    con = console()
    _print(con, fit_table(f"Gthulhu strategies at {settings.api_url} (legacy API)", columns, cells, con.width),
           None if rows else "no strategies")


def _list_manager(settings: Settings, as_json: bool) -> None:
    factory.require_credentials(settings, MANAGER)
    with factory.manager_client(settings) as client:
        policies = client.list_policies()
    rows = manager.describe(policies, settings.node_name)
    boosted = _dm_rows(settings, policies) if settings.dm_url else None
    if as_json:
        doc: dict[str, Any] = {"api": "manager", "url": settings.api_url, "user": settings.username,
                               "node": settings.node_name, "policies": rows}
        if boosted is not None:
            doc["decision_maker"] = {"url": settings.dm_url, "boosted": boosted}
        _emit_json(doc)
        return
    con = console()
    cells = [[r["owner"] or "other", ", ".join(r["comms"]) if r["owner"] else r["commandRegex"] or "-",
              ", ".join(r["nodeNames"]) or ("selectors" if r["nodeSelectors"] else "-"), str(r["priority"]),
              r["execution_time_human"], r["id"]] for r in rows]
    columns = [Col("owner", key=True), Col("comms / regex", key=True, wrap=True), Col("nodes", min=8, drop=2),
               Col("priority", "right", min=3, drop=3), Col("exec time", min=5, drop=1), Col("id", min=12, drop=4)]
    title = f"Node scheduling policies of {settings.username} at {settings.api_url} (Gthulhu Manager)"
    _print(con, fit_table(title, columns, cells, con.width), None if rows else "no policies")
    if boosted is not None:
        cells = [[str(b["pid"]), b["comm"] or "-", b["policy"], b["verdict"]] for b in boosted]
        columns = [Col("PID", "right", key=True), Col("comm", key=True), Col("policy", key=True),
                   Col("validation", min=10)]
        title = f"Boosted on node {settings.node_name} under gtp5g-op's policies (Decision Maker {settings.dm_url})"
        _print(con, fit_table(title, columns, cells, con.width),
               None if boosted else "no process boosted under gtp5g-op's policies")


def _dm_rows(settings: Settings, policies: list[manager.NodePolicy]) -> list[dict]:
    """PIDs the Decision Maker boosts under gtp5g-op's policies, each checked by this host's validation."""
    import psutil

    from gtp5g_op.trace.validate import ProcessValidator

    owners = {p.command_regex: p.owner for p in policies if p.owner}
    reader = factory.dm_reader(settings)
    assert reader is not None
    with reader.client:
        boosted = reader.boosted(owners)
    validator = ProcessValidator(exe_allow=settings.exe_allow, threads=settings.threads)
    rows = []
    for pid, regex in sorted(boosted.items()):
        try:
            comm = psutil.Process(pid).name()
        except (psutil.Error, ValueError, OverflowError):
            comm = None
        verdict = validator.check(pid, comm) if comm else None
        rows.append({"pid": pid, "comm": comm, "policy": owners[regex], "command_regex": regex,
                     "valid": bool(verdict and verdict.ok),
                     "verdict": "valid" if verdict and verdict.ok else
                     f"rejected: {verdict.reason}" if verdict else "not on this host"})
    return rows


@strategies.command("push")
@shared_options(*GLOBAL, *API, STATE_DIR)
@click.option("--pid", "pids", type=click.IntRange(min=1), multiple=True, help="Legacy API: thread id to favour (repeatable).")
@click.option("--comm", "comms", multiple=True, metavar="NAME", help="Manager: comm to favour on --node-name (repeatable).")
@click.option("--priority/--no-priority", default=None, help="Run before others [config policy.priority; default true].")
@click.option("--execution-time", help="Time slice: 20ms, 1.5s, 500us or ns [config policy.execution_time; default 20ms].")
@click.option("--replace", is_flag=True, help="Legacy API: replace the whole set instead of keeping other entries.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
@cli_errors
def push_cmd(ctx: click.Context, pids: tuple[int, ...], comms: tuple[str, ...], priority: bool | None,
             execution_time: str | None, replace: bool, as_json: bool) -> None:
    """Add or update strategies for PIDs (legacy API), keeping every other entry unless --replace; or,
    against a Manager, a policy of this node per comm (PIDs mean nothing to Gthulhu v1.x).

    \b
    Examples:
      gtp5g-op strategies push --pid 4242
      gtp5g-op strategies push --pid 4242 --pid 4243 --no-priority --execution-time 5ms
      gtp5g-op strategies push --comm nr-gnb --comm nr-ue --node-name upf-1
    """
    settings = _settings(ctx, priority=priority, execution_time=execution_time)
    _need_targets(pids, comms)
    policy = settings.policy
    kind = factory.resolve_kind(settings)
    if kind == MANAGER:
        if pids or not comms:
            raise UsageError("a Gthulhu v1.x Manager takes no PIDs: its policies boost by comm",
                             "give --comm NAME (repeatable), e.g. --comm nr-gnb")
        level = policy.manager_priority if policy.priority else 0
        with factory.manager_client(settings) as client:
            result = manager.push_comms(client, settings.node_name, comms, level, policy.execution_time_ns)
        doc = {"api": "manager", "node": settings.node_name, "created": result.created, "updated": result.updated,
               "unchanged": sorted(set(comms) - set(result.created) - set(result.updated)),
               "priority": level, "execution_time": policy.execution_time_ns}
        if as_json:
            _emit_json(doc)
            return
        parts = [f"{verb} the policy for {', '.join(doc[key])}" for key, verb in
                 (("created", "created"), ("updated", "updated"), ("unchanged", "kept")) if doc[key]]
        _say(f"{'; '.join(parts)} on node {settings.node_name} (priority {level}, "
                   f"{format_duration_ns(policy.execution_time_ns)})")
        return
    if comms or not pids:
        raise UsageError("a legacy Gthulhu API takes PIDs, not comms", "give --pid N (repeatable)")
    _check_pids(pids)
    with factory.connect(settings, kind) as client:
        result = legacy.push_pids(
            client, pids, policy.priority, policy.execution_time_ns, _store(settings),
            replace_all=replace, known_selectors=settings.known_selectors,
        )
    doc = {
        "pushed": [legacy.strategy_for(p, policy.priority, policy.execution_time_ns) for p in sorted(set(pids))],
        "kept_selector_strategies": result.selector_strategies,
        "kept_foreign_pids": result.foreign_pids,
        "total": len(result.body),
    }
    if as_json:
        _emit_json(doc)
    else:
        _say(
            f"pushed {_plural(len(doc['pushed']), 'strategy', 'strategies')} "
            f"(priority {str(policy.priority).lower()}, {format_duration_ns(policy.execution_time_ns)}); "
            f"kept {_plural(result.selector_strategies, 'selector strategy', 'selector strategies')} and "
            f"{_plural(len(result.foreign_pids), 'other PID strategy', 'other PID strategies')}"
        )


@strategies.command("delete")
@shared_options(*GLOBAL, *API, STATE_DIR)
@click.option("--pid", "pids", type=click.IntRange(min=1), multiple=True, help="Legacy API: PID whose strategy to remove (repeatable).")
@click.option("--comm", "comms", multiple=True, metavar="NAME", help="Manager: comm to remove from gtp5g-op's policies on --node-name.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
@click.pass_context
@cli_errors
def delete_cmd(ctx: click.Context, pids: tuple[int, ...], comms: tuple[str, ...], as_json: bool) -> None:
    """Remove the PID strategies for PIDs, whoever pushed them (legacy API); or, against a Manager, the
    comms from gtp5g-op's policies on this node (others' policies are never touched).

    \b
    Examples:
      gtp5g-op strategies delete --pid 4242
      gtp5g-op strategies delete --comm nr-ue --node-name upf-1
    """
    settings = _settings(ctx)
    _need_targets(pids, comms)
    kind = factory.resolve_kind(settings)
    if kind == MANAGER:
        if pids or not comms:
            raise UsageError("a Gthulhu v1.x Manager takes no PIDs: its policies boost by comm", "give --comm NAME")
        with factory.manager_client(settings) as client:
            removed_comms = manager.delete_comms(client, settings.node_name, comms)
        if as_json:
            _emit_json({"api": "manager", "node": settings.node_name, "removed": removed_comms})
        else:
            _say(f"removed {', '.join(removed_comms)} from gtp5g-op's policies on node {settings.node_name}")
        return
    if comms or not pids:
        raise UsageError("a legacy Gthulhu API takes PIDs, not comms", "give --pid N (repeatable)")
    _check_pids(pids)
    with factory.connect(settings, kind) as client:
        removed = legacy.delete_pids(client, pids, _store(settings), settings.known_selectors)
    if as_json:
        _emit_json({"removed": removed})
    else:
        _say(f"removed the strategies of PID {', '.join(map(str, removed))}")


@strategies.command("prune")
@shared_options(*GLOBAL, *API, STATE_DIR)
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
@click.pass_context
@cli_errors
def prune_cmd(ctx: click.Context, as_json: bool) -> None:
    """Remove only what gtp5g-op put there (by watch or push); keep all others. Always asks the server.

    \b
    Examples:
      gtp5g-op strategies prune
      gtp5g-op strategies --api-url http://gthulhu-api:80 prune --json
      gtp5g-op strategies prune --api manager --username ops --node-name upf-1
    """
    settings = _settings(ctx)
    kind = factory.resolve_kind(settings)
    if kind == MANAGER:
        with factory.manager_client(settings) as client:
            deleted = manager.prune(client, settings.node_name)
        if as_json:
            _emit_json({"api": "manager", "node": settings.node_name, "removed": [p.as_json() for p in deleted]})
        elif deleted:
            _say(f"deleted {_plural(len(deleted), 'policy', 'policies')} gtp5g-op put on node "
                       f"{settings.node_name}: {'; '.join(', '.join(p.comms) for p in deleted)}")
        else:
            _say(f"nothing to remove: {settings.api_url} holds no gtp5g-op policy of {settings.username} "
                       f"for node {settings.node_name}")
        return
    with factory.connect(settings, kind) as client:
        result = legacy.prune(client, _store(settings), settings.known_selectors)
    if as_json:
        _emit_json({"removed": result.removed, "recorded": result.recorded, "ownership_file": result.ownership_file,
                    "server_pid_strategies": result.server_pid_strategies})
    elif result.removed:
        _say(f"removed the strategies gtp5g-op put there: PID {', '.join(map(str, result.removed))}")
    elif result.recorded:
        _say(f"nothing to remove: the PIDs in {result.ownership_file} ({', '.join(map(str, result.recorded))}) "
                   f"are no longer on {settings.api_url}; forgot them")
    else:
        _say(f"nothing to remove: {result.ownership_file} records no strategy of gtp5g-op for {settings.api_url} "
                   f"(the server holds {_plural(result.server_pid_strategies, 'PID strategy', 'PID strategies')}, "
                   f"none of them gtp5g-op's)")
