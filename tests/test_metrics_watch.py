"""The metrics endpoint scraped over HTTP while ``gtp5g-op watch --replay`` runs in another process."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

SECONDS = 20.0  # trace time the capture spans
RATE = 50  # events per trace second
SPEED = 5.0  # replay speed: the run takes about SECONDS / SPEED = 4 s of wall time
MALFORMED = 3
LOST = 7


def write_capture(path: Path) -> int:
    """A trace_pipe capture in the tracer's format: nr-gnb / nr-ue threads, a few bad lines, one loss.

    Returns the number of lines written.
    """
    lines = []
    subjects = [("nr-gnb", 4242, 4240), ("nr-gnb", 4243, 4240), ("nr-ue", 5151, 5150)]
    for n in range(int(SECONDS * RATE)):
        ts = 1000.0 + n / RATE
        comm, pid, tgid = subjects[n % len(subjects)]
        task = f"{comm}-{pid}".rjust(16)
        lines.append(f"{task} [001] ..s21 {ts:.6f}: bpf_trace_printk: fentry/gtp5g_encap_recv: "
                     f"PID={pid}, TGID={tgid}, CPU=1, LEN=108, DEV=upfgtp, TEID=0x{n:x}")
        if n == 10:  # early, so a mid-run scrape sees them
            lines += ["garbage without the trace shape"] * MALFORMED
            lines.append(f"CPU:1 [LOST {LOST} EVENTS]")
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def scrape(port: int) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if not s.labels}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_scraped_while_replay_runs(tmp_path):
    capture = tmp_path / "trace.txt"
    total = write_capture(capture)
    port = free_port()
    exe = shutil.which("gtp5g-op") or str(Path(sys.executable).parent / "gtp5g-op")
    cmd = [exe, "watch", "--replay", str(capture), "--no-validate", "--metrics-port", str(port),
           "--speed", str(SPEED)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[dict[str, float]] = []
    health_codes: list[int] = []
    try:
        deadline = time.monotonic() + SECONDS / SPEED + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                seen.append(scrape(port))
                health_codes.append(requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code)
            except requests.ConnectionError:
                pass  # not listening yet, or already gone
            time.sleep(0.2)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert seen, f"never managed to scrape http://127.0.0.1:{port}/metrics: {err[-2000:]}"
    lines = [s["gtp5g_op_lines_total"] for s in seen]
    assert lines == sorted(lines), "a counter went backwards"
    mid = [s for s in seen if 0 < s["gtp5g_op_lines_total"] < total]
    assert mid, f"no scrape caught the replay mid-run (lines seen: {lines[:3]} ... {lines[-3:]} of {total})"
    assert len({s["gtp5g_op_lines_total"] for s in mid}) >= 2, "the counter did not move between scrapes"
    late = mid[-1]
    assert late["gtp5g_op_events_total"] > 0
    assert late["gtp5g_op_matched_events_total"] > 0
    assert late["gtp5g_op_malformed_lines_total"] == MALFORMED
    assert late["gtp5g_op_lost_events_total"] == LOST
    assert late["gtp5g_op_targets"] >= 1 and late["gtp5g_op_threads"] >= 1
    assert health_codes and all(code == 200 for code in health_codes), health_codes
