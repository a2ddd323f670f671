"""What people see: the live table while watching, and the summary table at exit.

Every string from the trace or the process table (comm, hook names, rejection reasons with executable
paths) goes through :func:`gtp5g_op.cli.output.text`, so it is shown literally, never as rich markup.
At 80 columns pid, comm and hook names stay whole; timestamps and counts are dropped first.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gtp5g_op.cli.output import Col, fit_table, text
from gtp5g_op.cli.output import console as make_console
from gtp5g_op.trace.pipeline import Pipeline

MAX_PIDS_PER_REASON = 6  # pids listed after a repeated rejection reason before "and N more"

_BASE = (
    Col("pid", "right", key=True),
    Col("tgid", "right", drop=5),
    Col("comm", key=True),
    Col("events", "right", drop=4),
    Col("first seen", "right", drop=7),
    Col("last seen", "right", drop=6),
    Col("hooks", key=True, wrap=True),
)
_STATE = Col("state", min=10)
_LIVE = {"ev/s": Col("ev/s", "right", drop=3), "pushed": Col("pushed")}


def _ts(value: float | None) -> str:
    return "-" if not value else f"{value:.6f}"


def _state(p: dict) -> Text:
    if p.get("exited"):
        return Text("exited", style="dim")
    if p["valid"]:
        return Text("thread of target" if p.get("from_threads") and not p["events"] else "valid", style="green")
    return Text(f"rejected ({p.get('code') or 'see below'})", style="red")


def summary_table(report: dict, width: int, title: str = "Target processes",
                  extra: dict[str, Callable[[dict], str]] | None = None) -> Table:
    """The per-subject table of a report (``watch --json`` shape) fitted to ``width``, with ``extra`` columns."""
    extra = extra or {}
    cols = list(_BASE)
    validated = any("valid" in p for p in report["processes"])
    if validated:
        cols.append(_STATE)
    cols += [_LIVE.get(name, Col(name, "right", drop=2)) for name in extra]
    rows = []
    for p in report["processes"]:
        row: list[str | Text] = [
            str(p["pid"]), str(p["tgid"] or "-"), text(p["comm"]), str(p["events"]),
            _ts(p["first_seen"]), _ts(p["last_seen"]), text(", ".join(p["hooks"]) or "-")]
        if validated:
            row.append(_state(p))
        rows.append(row + [cell(p) for cell in extra.values()])
    return fit_table(text(title), cols, rows, width)


def rejection_notes(report: dict) -> list[Text]:
    """Each distinct rejection reason once, with the pids it applies to."""
    by_reason: dict[tuple[str, str], list[int]] = {}
    for p in report["processes"]:
        if p.get("valid") is False:
            by_reason.setdefault((p.get("code") or "", p.get("reason") or "no reason given"), []).append(p["pid"])
    notes = []
    for (code, reason), pids in by_reason.items():
        shown = ", ".join(map(str, pids[:MAX_PIDS_PER_REASON]))
        more = f" and {len(pids) - MAX_PIDS_PER_REASON} more" if len(pids) > MAX_PIDS_PER_REASON else ""
        label = f"rejected ({code})" if code else "rejected"
        notes.append(Text.assemble((label, "red"), ": ", text(reason), f" [pid {shown}{more}]"))
    return notes


def problem_line(report: dict) -> Text | None:
    """The explanation of a report whose every target was rejected (``report["problem"]``), if any."""
    problem = report.get("problem")
    if not problem:
        return None
    return Text.assemble(("gtp5g-op: ", "bold"), text(problem["message"]), "; fix: ", text(problem["fix"]),
                         style="yellow")


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
    """Print the summary table, each rejection reason once, the statistics and any problem."""
    console = console or make_console()
    if report["processes"]:
        console.print(summary_table(report, console.width))
    else:
        console.print(Text("no target process" + (" passed validation" if report.get("rejected") else
                                                  " in the trace (no event named a comm that --match selects)")))
    for note in rejection_notes(report):
        console.print(note)
    console.print(stats_line(report))
    line = problem_line(report)
    if line is not None:
        console.print(line)
    if report.get("push") and not report["push"].get("final_push_ok", True):
        console.print(Text("the final push to the Gthulhu API failed (see the log)", style="bold red"))


class LiveView:
    """A rich live display of the targets, refreshed by the watch loop."""

    def __init__(self, console: Console | None = None):
        self.console = console or make_console()
        self.live = Live(console=self.console, auto_refresh=False, transient=True)
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

        table = summary_table(report, self.console.width, "gtp5g-op watch: targets (Ctrl-C to stop)",
                              {"ev/s": rate, "pushed": pushed})
        if instance is not None:
            report["stats"]["overruns"] = instance.overruns()
        self.live.update(Group(table, *rejection_notes(report), stats_line(report)), refresh=True)

    def close(self) -> None:
        self.live.stop()
