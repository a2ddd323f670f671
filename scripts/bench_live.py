#!/usr/bin/env python3
"""Benchmark the live pipeline on the real kernel: lines/s sustained with no lost lines, and CPU share.

The selftest probe (tracer/selftest.bpf.c, two lines per getppid() call, one line per event: the
rate the external gtp5g-tracer still emits) is loaded; a load process with a name of its own calls getppid()
at a fixed rate; `gtp5g-op watch --json --duration D` reads its own private tracefs instance with
validation on. For each rate the script reports the lines the watch read, the lines lost (LOST
markers + the instance's overrun counters), and the watch's CPU share while the load runs (its
utime+stime from /proc over the load's wall time; start-up excluded) and over its whole life.

Each rate runs every reader of ``--readers`` back to back in the same run:

- ``raw``: the watch reading the instance's binary ring buffers (``--read-mode raw``, the default where
  it works), batched every 0.1 s;
- ``text``: the watch reading the instance's text trace_pipe (``--read-mode text``), batched the same
  way: the baseline;
- ``text-unbatched``: the text reader handing on every page read (``--read-batch 0``), the reader
  before batching;
- ``dd``: `dd` draining the same kind of text pipe: nearly all of its CPU is the kernel formatting every
  line inside read(2), a cost every trace_pipe reader pays and the raw reader does not.

A run whose watch read more lines than the load made had another probe on getppid attached meanwhile
(bpf_printk lines reach every instance): its figures are high.

Needs root, clang and bpftool. usage: sudo scripts/bench_live.py [--rates 10000,50000,...] [--seconds 6]
[--readers raw,text,text-unbatched,dd]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = r"""
import ctypes, os, sys, time
ctypes.CDLL(None).prctl(15, sys.argv[3].encode(), 0, 0, 0)
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
t0, done = time.monotonic(), 0
while (now := time.monotonic()) - t0 < seconds:
    target = int((now - t0) * rate)
    while done < target:
        os.getppid()
        done += 1
    time.sleep(0.0005)
print(done)
"""


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


READERS = {"raw": ("raw", 0.1), "text": ("text", 0.1), "text-unbatched": ("text", 0.0)}


def run_rate(lines_per_s: int, seconds: float, buffer_kb: int, reader: str) -> dict:
    """One watch + one load at ``lines_per_s``; what the watch saw and what it cost."""
    mode, read_batch = READERS[reader]
    instance = f"gtp5g-op-bench-{os.getpid()}"
    comm = f"bench{os.getpid()}"[:15]  # a name of its own: others' probes and loads share the kernel's lines
    cmd = [sys.executable, "-m", "gtp5g_op", "watch", "--json", "--instance", instance, "--match", f"^{comm}$",
           "--buffer-kb", str(buffer_kb), "--duration", str(seconds + 2), "--read-batch", str(read_batch),
           "--read-mode", mode,
           "--exe-allow", os.path.realpath(sys.executable)]  # the load is this interpreter, renamed
    with tempfile.TemporaryFile() as out:
        watch = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE)
        pipe = Path("/sys/kernel/tracing/instances") / instance / "trace_pipe"
        while not pipe.exists():
            if watch.poll() is not None:
                sys.exit(f"bench: watch failed: {watch.stderr.read().decode()[-800:]}")  # type: ignore[union-attr]
            time.sleep(0.05)
        time.sleep(0.5)
        cpu0, t0 = _cpu_seconds(watch.pid), time.monotonic()
        load = subprocess.run([sys.executable, "-c", LOAD, str(lines_per_s / 2), str(seconds), comm],
                              capture_output=True, text=True, check=True)
        time.sleep(0.3)  # the last batch
        cpu1, t1 = _cpu_seconds(watch.pid), time.monotonic()
        calls = int(load.stdout)
        _, status, usage = os.wait4(watch.pid, 0)
        watch.returncode = os.waitstatus_to_exitcode(status)
        if watch.returncode != 0:
            sys.exit(f"bench: watch exited {watch.returncode}: {watch.stderr.read().decode()[-800:]}")  # type: ignore[union-attr]
        out.seek(0)
        report = json.loads(out.read())
    st = report["stats"]
    cpu = usage.ru_utime + usage.ru_stime
    mine = st["matched"]  # the load exits before the report, so its record is gone; the count stays
    if report.get("reader", {}).get("mode") != mode:
        sys.exit(f"bench: the watch read in {report.get('reader')} mode, not {mode}")
    return {
        "reader": reader,
        "read_batch_s": read_batch,
        "target_lines_per_s": lines_per_s,
        "lines_generated": 2 * calls,
        "lines_read": mine,
        "achieved_lines_per_s": round(mine / seconds),
        "lost": st["lost_events"] + st.get("overruns", 0),
        "watch_cpu_share_steady": round((cpu1 - cpu0) / (t1 - t0), 3),
        "watch_cpu_share_total": round(cpu / (seconds + 2), 3),
        "watch_cpu_s": round(cpu, 2),
    }


def run_floor(lines_per_s: int, seconds: float, buffer_kb: int) -> dict:
    """``dd`` draining a private instance's trace_pipe at ``lines_per_s``: a plain blocking reader, most of
    whose CPU is the kernel formatting every line as text inside read(2)."""
    from gtp5g_op.trace.tracefs import TraceInstance

    comm = f"bench{os.getpid()}"[:15]
    with TraceInstance(f"gtp5g-op-bench-dd-{os.getpid()}", buffer_kb=buffer_kb) as inst:
        dd = subprocess.Popen(["dd", f"if={inst.pipe}", "of=/dev/null", "bs=1M", "status=none"])
        try:
            time.sleep(0.5)
            cpu0, t0 = _cpu_seconds(dd.pid), time.monotonic()
            subprocess.run([sys.executable, "-c", LOAD, str(lines_per_s / 2), str(seconds), comm],
                           capture_output=True, text=True, check=True)
            time.sleep(0.3)
            cpu1, t1 = _cpu_seconds(dd.pid), time.monotonic()
        finally:
            dd.terminate()
            dd.wait()
        lost = inst.overruns()
    return {"reader": "dd", "target_lines_per_s": lines_per_s, "lost": lost,
            "watch_cpu_share_steady": round((cpu1 - cpu0) / (t1 - t0), 3)}


def run_latency(runs: int) -> dict:
    """Seconds from a getppid() call to its line leaving the reader (the first line of a batch after an
    idle spell), for the raw reader and the batched text reader, ``runs`` times each, idle gaps between."""
    import random
    import threading

    from gtp5g_op.trace import rawbuf, tracefs

    tid = threading.get_native_id()
    out: dict = {}
    for reader in ("raw", "text"):
        with tracefs.TraceInstance(f"gtp5g-op-bench-lat-{os.getpid()}", state_dir=Path(tempfile.mkdtemp())) as inst:
            (inst.path / "events/bpf_trace/bpf_trace_printk/filter").write_text(f"common_pid == {tid}\n")
            stop = threading.Event()
            if reader == "raw":
                inst.wake_on_any_data()
                chunks = rawbuf.RawReader(inst.path, stop, batch_seconds=0.1)
            else:
                chunks = tracefs.tail(inst.pipe, stop, batch_seconds=0.1)
            arrived: list[float] = []
            got = threading.Event()

            def read() -> None:
                for chunk in chunks:
                    if f"PID={tid},".encode() in chunk:
                        arrived.append(time.monotonic())
                        got.set()

            thread = threading.Thread(target=read, daemon=True)
            thread.start()
            delays = []
            for _ in range(runs):
                time.sleep(random.uniform(0.3, 0.8))  # idle: the reader is asleep in poll
                got.clear()
                t0 = time.monotonic()
                os.getppid()
                if got.wait(5):
                    delays.append(arrived[-1] - t0)
            stop.set()
            thread.join(2)
            if hasattr(chunks, "close"):
                chunks.close()
        delays.sort()
        out[reader] = {"runs": len(delays), "p50_s": round(delays[len(delays) // 2], 4),
                       "max_s": round(delays[-1], 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="10000,25000,50000,100000,200000,400000")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--buffer-kb", type=int, default=8192)
    ap.add_argument("--readers", default="raw,text,dd",
                    help="Comma-separated: raw, text, text-unbatched, dd (see above).")
    ap.add_argument("--latency-runs", type=int, default=20,
                    help="Also time a call -> its line leaving the reader this many times per reader (0: skip).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root (BPF and tracefs); fix: run with sudo")
    from gtp5g_op.kernel.bpf_loader import BpfObject
    from gtp5g_op.kernel.tracer_build import ensure_built

    results = []
    readers = args.readers.split(",")
    unknown = set(readers) - set(READERS) - {"dd"}
    if unknown:
        sys.exit(f"bench: unknown reader(s) {', '.join(sorted(unknown))}; fix: pick from raw, text, text-unbatched, dd")
    with BpfObject(ensure_built()["selftest"]) as probe:
        if not probe.attached:
            sys.exit(f"bench: the selftest probe did not attach: {[r.error for r in probe.report]}")
        for rate in (int(r) for r in args.rates.split(",")):
            for reader in readers:
                if reader == "dd":
                    results.append(run_floor(rate, args.seconds, args.buffer_kb))
                    if not args.json:
                        r = results[-1]
                        print(f"{r['reader']:>14} {rate:>7} lines/s: lost {r['lost']:>6}, dd CPU "
                              f"{r['watch_cpu_share_steady']:.1%} while loaded", flush=True)
                    continue
                results.append(run_rate(rate, args.seconds, args.buffer_kb, reader))
                if not args.json:
                    r = results[-1]
                    print(f"{r['reader']:>14} {rate:>7} lines/s: read {r['lines_read']:>8} of {r['lines_generated']:>8} "
                          f"({r['achieved_lines_per_s']:>7}/s), lost {r['lost']:>6}, watch CPU "
                          f"{r['watch_cpu_share_steady']:.1%} while loaded ({r['watch_cpu_share_total']:.1%} "
                          "over its life)", flush=True)
        latency = run_latency(args.latency_runs) if args.latency_runs > 0 else None
    summary: dict = {"runs": results}
    if latency:
        summary["latency"] = latency
        if not args.json:
            for reader, lat in latency.items():
                print(f"{reader:>14} first line after idle -> out of the reader: p50 {lat['p50_s'] * 1000:.0f} ms, "
                      f"max {lat['max_s'] * 1000:.0f} ms over {lat['runs']} runs", flush=True)
    for reader in READERS:
        clean = [r for r in results if r["reader"] == reader and r["lost"] == 0
                 and r["lines_read"] >= r["lines_generated"]]
        if any(r["reader"] == reader for r in results):
            summary[f"max_lines_per_s_without_loss_{reader}"] = max((r["achieved_lines_per_s"] for r in clean), default=0)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for key, value in summary.items():
            if key.startswith("max_lines"):
                print(f"{key.replace('_', ' ')}: {value} lines/s")


if __name__ == "__main__":
    main()
