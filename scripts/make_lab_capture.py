#!/usr/bin/env python3
"""Write the bundled lab capture: a trace_pipe stream shaped like the first lab run.

One gNB (nr-gnb, 11 threads) and one UE (nr-ue, 12 threads) carry GTP-U through gtp5g, traced by
the external gtp5g-tracer (several bpf_printk lines per hook) and by the scheduler's own printk
(`stop:`/`enqueue: pid=N (name)`), mixed with softirq work in <idle>, ksoftirqd and iperf3.
It is synthetic (no capture from a real lab is distributed), deterministic for a given seed, and
follows ../shared/reference/trace-formats.md.

usage: make_lab_capture.py [--packets N] [--seed S] OUT.gz
"""

from __future__ import annotations

import argparse
import gzip
import random

GNB_TGID, UE_TGID = 1150348, 1150390
GNB = [GNB_TGID] + list(range(1150360, 1150370))  # 11 threads
UE = [UE_TGID] + list(range(1150391, 1150402))  # 12 threads
OTHERS = [("<idle>", 0, 0), ("ksoftirqd/1", 24, 24), ("iperf3", 5555, 5555), ("kworker/u16:2", 1234, 1234)]


def line(comm: str, pid: int, cpu: int, flags: str, ts: float, msg: str) -> str:
    task = f"{comm}-{pid}"
    return f"{task:>24s} [{cpu:03d}] {flags} {ts:.6f}: bpf_trace_printk: {msg}\n"


def uplink(rnd: random.Random, ts: float) -> list[str]:
    tid = rnd.choice(GNB)
    cpu, n = rnd.randrange(8), rnd.randrange(60, 1400)
    hook = "fentry/gtp5g_encap_recv"
    out = [
        line("nr-gnb", tid, cpu, "..s21", ts, f"{hook}: DEV=n3"),
        line("nr-gnb", tid, cpu, "..s21", ts + 2e-6, f"{hook}: GTP packet detected (len >= 8)"),
        line("nr-gnb", tid, cpu, "..s21", ts + 3e-6, f"{hook}: PID={tid}, TGID={GNB_TGID}, CPU={cpu}"),
        line("nr-gnb", tid, cpu, "..s21", ts + 4e-6, f"{hook}: LEN={n}"),
        line("nr-gnb", tid, cpu, "..s21", ts + 9e-6, f"fexit/pdr_find_by_gtp1u: PID={tid}, PDR=Found"),
    ]
    return out


def downlink(rnd: random.Random, ts: float) -> list[str]:
    comm, pid, _ = rnd.choice(OTHERS[:3])
    cpu, n = rnd.randrange(8), rnd.randrange(60, 1400)
    flags = "b.s31" if pid == 0 else "..s11"
    return [
        line(comm, pid, cpu, flags, ts, f"fentry/gtp5g_handle_skb_ipv4: PID={pid}, TGID={pid}, CPU={cpu}"),
        line(comm, pid, cpu, flags, ts + 1e-6, "fentry/gtp5g_handle_skb_ipv4: DEV=upfgtp"),
        line(comm, pid, cpu, flags, ts + 3e-6, f"fexit/ip4_find_route: PID={pid}, Route=Found"),
        line(comm, pid, cpu, flags, ts + 7e-6, f"fentry/gtp5g_push_header: PID={pid}, TGID={pid}, LEN={n}"),
        line(comm, pid, cpu, flags, ts + 9e-6, f"fexit/gtp5g_xmit_skb_ipv4: LEN={n + 36}, TS={int((ts + 9e-6) * 1e9)}"),
    ]


def sched(rnd: random.Random, ts: float) -> list[str]:
    comm, tgid, threads = rnd.choice([("nr-gnb", GNB_TGID, GNB), ("nr-ue", UE_TGID, UE)])
    tid, cpu = rnd.choice(threads), rnd.randrange(8)
    if rnd.random() < 0.5:
        return [line(comm, tid, cpu, "d..31", ts, f"stop: pid={tid} ({comm})")]
    waker, wpid, _ = rnd.choice(OTHERS)
    return [line(waker, wpid, cpu, "d.h51", ts, f"enqueue: pid={tid} ({comm})")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--packets", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    ts = 34202.967769
    with gzip.GzipFile(args.out, "wb", mtime=0) as out:
        for i in range(args.packets):
            ts += rnd.random() * 2e-4
            kind = rnd.choice((uplink, downlink, sched))
            out.write("".join(kind(rnd, ts)).encode())
            ts += 1e-5
            if i == args.packets // 2:
                out.write(b"CPU:3 [LOST 17 EVENTS]\n")


if __name__ == "__main__":
    main()
