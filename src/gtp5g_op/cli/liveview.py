"""What people see: the live table while watching, and the summary table at exit."""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gtp5g_op.trace.parser import printable
from gtp5g_op.trace.pipeline import Pipeline


def _ts(value: float | None) -> str:
    return "-" if not value else f"{value:.6f}"


def summary_table(
    report: dict, title: str = "Target processes", extra: dict[str, Callable[[dict], str]] | None = None
) -> Table:
    """The per-subject table of a report (``watch --json`` shape), with ``extra`` columns."""
    extra = extra or {}
    table = Table(title=title, title_justify="left")
    for col, justify in (("pid", "right"), ("tgid", "right"), ("comm", "left"), ("events", "right"),
                         ("first seen", "right"), ("last seen", "right"), ("hooks", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    validated = any("valid" in p for p in report["processes"])
    if validated:
        table.add_column("state")
    for col in extra:
        table.add_column(col, justify="right")
    for p in report["processes"]:
        row = [str(p["pid"]), str(p["tgid"] or "-"), printable(p["comm"]), str(p["events"]),
               _ts(p["first_seen"]), _ts(p["last_seen"]), ", ".join(printable(h) for h in p["hooks"]) or "-"]
        if validated:
            row.append("exited" if p.get("exited") else
                       "thread of target" if p.get("from_threads") and p["valid"] and not p["events"] else
                       "valid" if p["valid"] else f"rejected: {p['reason']}")
        table.add_row(*row, *(cell(p) for cell in extra.values()))
    return table


def stats_line(report: dict) -> Text:
    """One line of parse statistics (and push state, when pushing)."""
    st = report["stats"]
    parts = [f"lines {st['lines']}", f"events {st['events']}", f"matched {st['matched']}",
             f"malformed {st['malformed']}", f"lost {st['lost_events']}"]
    if "overruns" in st:
        parts.append(f"overruns {st['overruns']}")
    push = report.get("push")
    if push:
        parts.append(f"pushes ok {push.get('pushes_ok', 0)} failed {push.get('pushes_failed', 0)}")
    return Text("  ".join(parts), style="bold")


def print_summary(report: dict, console: Console | None = None) -> None:
    """Print the summary table and statistics."""
    console = console or Console()
    console.print(summary_table(report))
    console.print(stats_line(report))
    if report.get("push") and not report["push"].get("final_push_ok", True):
        console.print(Text("the final push to the Gthulhu API failed (see the log)", style="bold red"))


class LiveView:
    """A rich live display of the targets, refreshed by the watch loop."""

    def __init__(self, console: Console | None = None):
        self.live = Live(console=console or Console(), auto_refresh=False, transient=True)
        self.live.start()
        self._last: dict[tuple[int, str], tuple[int, float]] = {}

    def __call__(self, pipeline: Pipeline, instance: Any) -> None:
        report = pipeline.report()
        now = time.monotonic()
        status = getattr(pipeline.pusher, "status", None)

        def rate(p: dict) -> str:
            key = (p["pid"], p["comm"])
            n0, t0 = self._last.get(key, (p["events"], now))
            self._last[key] = (p["events"], now)
            return f"{(p['events'] - n0) / (now - t0):.0f}" if now > t0 else "0"

        def pushed(p: dict) -> str:
            return ("yes" if status is not None and status.last_ok and p.get("valid") is not False
                    and not p.get("exited") else "-")

        table = summary_table(report, "gtp5g-op watch: targets (Ctrl-C to stop)", {"events/s": rate, "pushed": pushed})
        if instance is not None:
            report["stats"]["overruns"] = instance.overruns()
        self.live.update(Group(table, stats_line(report)), refresh=True)

    def close(self) -> None:
        self.live.stop()
