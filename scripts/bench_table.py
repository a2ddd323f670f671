#!/usr/bin/env python3
"""Benchmark: the watch table laid out by ``fit_table`` (fixed widths, key columns whole) against the same
rows in a plain rich Table that sizes its own columns (the layout before), rendered at 80 columns.

Both build the table and render it to a string, as the live view does once a second; the ratio is
``fit_table / rich auto`` (lower is faster), median of ``--rounds`` alternating runs.

usage: python3 scripts/bench_table.py [--rows 500] [--rounds 7]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

from rich.console import Console
from rich.table import Table

from gtp5g_op.cli.liveview import summary_table
from gtp5g_op.cli.output import text

HOOKS = ["enqueue", "fentry/gtp5g_encap_recv", "fexit/pdr_find_by_gtp1u", "stop"]


def report(rows: int) -> dict:
    return {"processes": [{"pid": 1_150_000 + i, "tgid": 1_150_000, "comm": "nr-gnb", "events": i,
                           "first_seen": 34202.969726, "last_seen": 34203.408986, "hooks": HOOKS,
                           "valid": True, "reason": "ok", "code": "ok", "from_threads": False}
                          for i in range(rows)], "stats": {}}


def fitted(doc: dict) -> str:
    console = Console(file=io.StringIO(), width=80)
    console.print(summary_table(doc, 80, "targets", {"ev/s": lambda p: "12", "pushed": lambda p: "yes"}))
    return console.file.getvalue()


def rich_auto(doc: dict) -> str:
    console = Console(file=io.StringIO(), width=80)
    table = Table(title="targets")
    for col in ("pid", "tgid", "comm", "events", "first seen", "last seen", "hooks", "state", "ev/s", "pushed"):
        table.add_column(col)
    for p in doc["processes"]:
        table.add_row(str(p["pid"]), str(p["tgid"]), text(p["comm"]), str(p["events"]), f"{p['first_seen']:.6f}",
                      f"{p['last_seen']:.6f}", text(", ".join(p["hooks"])), "valid", "12", "yes")
    console.print(table)
    return console.file.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    doc = report(args.rows)
    times: dict[str, list[float]] = {"fit_table": [], "rich auto": []}
    for _ in range(args.rounds):
        for name, fn in (("fit_table", fitted), ("rich auto", rich_auto)):
            t0 = time.perf_counter()
            fn(doc)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, value in med.items():
        print(f"{name:10s} {value * 1000:7.1f} ms for {args.rows} rows at 80 columns")
    print(f"ratio fit_table / rich auto: {med['fit_table'] / med['rich auto']:.2f}")


if __name__ == "__main__":
    main()
