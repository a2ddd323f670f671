#!/usr/bin/env python3
"""What naming `<...>` subjects from /proc costs the parser, as a ratio in one run.

Two streams of the same length: (A) tracer lines whose task column names the thread (`nr-gnb-TID`), and
(B) the same lines with the comm the kernel forgot (`<...>-TID`). The TIDs are live threads of a real
process renamed nr-gnb (gtp5g_op.kernel.workload) plus pids that do not exist, so (B) takes both the
"found" and the "gone" path. Both are parsed in-process with validation's resolver
(procs.current_comm); best of N rounds, 64 KiB chunks like a trace_pipe read.

usage: scripts/bench_unknown_comm.py [--lines 1000000] [--rounds 5] [--dead 200]
"""

from __future__ import annotations

import argparse
import time

from gtp5g_op.kernel import workload
from gtp5g_op.trace.parser import TraceParser
from gtp5g_op.trace.validate import current_comm

CHUNK = 64 * 1024
LINE = "{task}-{tid} [001] ..s21 {ts:.6f}: bpf_trace_printk: fentry/gtp5g_encap_recv: PID={tid}, TGID={tgid}, CPU=1\n"


def stream(tids: list[int], tgid: int, lines: int, task: str | None) -> bytes:
    """``lines`` tracer lines cycling over ``tids``; the task column is ``task`` or the traced comm."""
    return "".join(LINE.format(task=task or "nr-gnb", tid=tids[i % len(tids)], tgid=tgid, ts=1 + i / 1e6)
                   for i in range(lines)).encode()


def parse_seconds(data: bytes, rounds: int) -> tuple[float, int]:
    """Best wall time over ``rounds`` to parse ``data`` in chunks, and the target subjects found."""
    best, found = float("inf"), 0
    for _ in range(rounds):
        parser = TraceParser(resolve_comm=current_comm)
        began = time.perf_counter()
        subjects = set()
        for at in range(0, len(data), CHUNK):
            subjects.update((u.pid, u.comm) for u in parser.feed(data[at:at + CHUNK]))
        subjects.update((u.pid, u.comm) for u in parser.finish())
        best, found = min(best, time.perf_counter() - began), len(subjects)
    return best, found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dead", type=int, default=200, help="pids in the stream that no process has")
    args = ap.parse_args()
    with workload.start("nr-gnb", threads=10, rate=1) as wl:
        live = list(wl.ready.tids)
        tids = live + [4_000_000 + i for i in range(args.dead)]
        named, n_named = parse_seconds(stream(tids, wl.pid, args.lines, None), args.rounds)
        unknown, n_unknown = parse_seconds(stream(tids, wl.pid, args.lines, "<...>"), args.rounds)
    print(f"{args.lines} lines, {len(live)} live nr-gnb threads + {args.dead} gone pids, best of {args.rounds}")
    print(f"  task column nr-gnb-TID  {named:.3f} s  {n_named} subjects")
    print(f"  task column <...>-TID   {unknown:.3f} s  {n_unknown} subjects (named from /proc)")
    print(f"  ratio <...>/named       {unknown / named:.2f}")


if __name__ == "__main__":
    main()
