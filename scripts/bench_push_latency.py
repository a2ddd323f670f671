#!/usr/bin/env python3
"""Time from a new target's first trace line to its strategy (legacy) or node policy (Manager) on the server.

Starts the Gthulhu test server (``--api legacy``: the legacy API; ``--api manager``: the v1.3 Manager
mode, with auto-detection, a user and a password file) and ``gtp5g-op watch --trace-pipe FIFO --push``
(with process validation on), then per run: starts a real child process named ``nr-gnb`` (prctl
PR_SET_NAME), writes one tracer line for it into the FIFO, and polls the server until the strategy for
that PID (legacy) or a policy matching its comm (Manager) is there. The child is then ended, so the
next push drops it again; against a Manager the next run starts once the policy is gone (every run
creates it anew). Prints p50/p99/max per API.

    python3 scripts/bench_push_latency.py --runs 100 --api both
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

CHILD = (
    "import ctypes, sys, time\n"
    "ctypes.CDLL(None).prctl(15, b'nr-gnb', 0, 0, 0)  # PR_SET_NAME: comm becomes nr-gnb\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


USER, PASSWORD, NODE = "bench", "bench-password", "bench-node"


def start_server(workdir: Path, api: str) -> tuple[subprocess.Popen, str, Path]:
    """The test server on a free port; returns the process, its URL and the public key path."""
    pub = workdir / "gthulhu.pub"
    extra = ["--mode", "manager", "--user", f"{USER}:{PASSWORD}", "--nodes", NODE] if api == "manager" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "gtp5g_op.gthulhu.testserver", "--port", "0", "--public-key-out", str(pub), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], 15)[0]:
        raise SystemExit("test server did not start")
    url = proc.stdout.readline().split()[-1]
    return proc, url, pub


def trace_line(pid: int) -> bytes:
    """One tracer event line for ``pid``, timestamped like trace_pipe (seconds since boot)."""
    ts = time.clock_gettime(time.CLOCK_MONOTONIC)
    return (
        f"{'nr-gnb-' + str(pid):>24s} [000] ..s21 {ts:12.6f}: bpf_trace_printk: "
        f"fentry/gtp5g_encap_recv: PID={pid}, TGID={pid}, CPU=0, LEN=100, DEV=n3\n"
    ).encode()


def server_has(url: str, pid: int, api: str) -> bool:
    """Whether the server holds a strategy for ``pid`` / a policy matching nr-gnb (test-server control view)."""
    state = requests.get(url + "/_control", timeout=5).json()
    if api == "manager":
        return any(p["nodeNames"] == [NODE] and re.search(p["commandRegex"], "nr-gnb") for p in state["policies"])
    return any(s.get("pid") == pid for s in state["strategies"])


def wait_gone(url: str, api: str, timeout: float) -> None:
    """Against a Manager: wait until the previous run's policy was deleted (its child is dead)."""
    deadline = time.monotonic() + timeout
    while api == "manager" and server_has(url, 0, api):
        if time.monotonic() > deadline:
            raise SystemExit(f"the policy of a dead target was not deleted within {timeout} s")
        time.sleep(0.01)


def one_run(fifo_fd: int, url: str, timeout: float, poll: float, api: str) -> float:
    """Start a target, write its first trace line, wait for its strategy; the latency in seconds."""
    wait_gone(url, api, timeout)
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        line = trace_line(child.pid)
        started = time.monotonic()
        os.write(fifo_fd, line)
        while not server_has(url, child.pid, api):
            if time.monotonic() - started > timeout:
                raise SystemExit(f"PID {child.pid} did not reach the server within {timeout} s")
            time.sleep(poll)
        return time.monotonic() - started
    finally:
        child.kill()
        child.wait()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def bench(api: str, args: argparse.Namespace) -> dict:
    """One server, one watch, ``args.runs`` measured runs against ``api``; the figures."""
    with tempfile.TemporaryDirectory(prefix="gtp5g-bench-") as tmp:
        work = Path(tmp)
        server, url, pub = start_server(work, api)
        fifo = work / "trace.fifo"
        os.mkfifo(fifo)
        env = {**os.environ, "GTP5G_OP_STATE_DIR": str(work / "state")}
        cmd = ["gtp5g-op", "watch", "--trace-pipe", str(fifo), "--push", "--api-url", url, "--json",
               # the child is this interpreter renamed: allow it explicitly (a renamed program is no target)
               "--exe-allow", os.path.realpath(sys.executable)]
        if api == "manager":
            (work / "password").write_text(PASSWORD + "\n")
            cmd += ["--username", USER, "--password-file", str(work / "password"), "--node-name", NODE]
        else:
            cmd += ["--public-key", str(pub)]
        watch = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        fd = os.open(fifo, os.O_WRONLY)  # blocks until the watch opened the FIFO
        latencies: list[float] = []
        try:
            one_run(fd, url, args.timeout, args.poll, api)  # warm-up: token, connections, imports
            for _ in range(args.runs):
                time.sleep(args.pause)
                latencies.append(one_run(fd, url, args.timeout, args.poll, api))
        finally:
            os.close(fd)
            try:
                out, err = watch.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                watch.kill()
                out, err = watch.communicate()
            state = requests.get(url + "/_control", timeout=5).json()
            server.terminate()
            server.wait()
    report = json.loads(out or b"{}").get("push", {})
    if watch.returncode not in (0, None) and err:
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    return {
        "api": api,
        "runs": len(latencies),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 1),
        "pushes_ok": report.get("pushes_ok"),
        "pushes_failed": report.get("pushes_failed"),
        "watch_exit": watch.returncode,
        # the children are dead: expect 0 (legacy PID strategies, Manager policies)
        "left_after_exit": sum(1 for s in state["strategies"] if "pid" in s) + len(state.get("policies", [])),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--api", choices=("legacy", "manager", "both"), default="both")
    parser.add_argument("--timeout", type=float, default=5.0, help="give up on one run after this long")
    parser.add_argument("--poll", type=float, default=0.002, help="server polling period (the resolution)")
    parser.add_argument("--pause", type=float, default=0.3, help="pause between runs (lets the dead child leave)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    ok = True
    for api in ("legacy", "manager") if args.api == "both" else (args.api,):
        figures = bench(api, args)
        ok &= figures["p99_ms"] < 1000
        if args.json:
            print(json.dumps(figures))
        else:
            print(
                f"{api}: {figures['runs']} runs: p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
                f"max {figures['max_ms']} ms (pushes ok {figures['pushes_ok']}, failed {figures['pushes_failed']}, "
                f"left on the server after exit {figures['left_after_exit']})"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
