"""``watch`` reading its private instance's ring buffers (``--read-mode raw``, what ``auto`` picks here) on the
real kernel: the selftest tracepoint probe (tracer/selftest.bpf.c, two lines per getppid(2)) and real
processes. bpf_printk lines reach every instance that enables them, so others' probes may add lines for
our pids: exact counts are checked against a text-reading twin watch of the same events, or with an
event filter on our own thread."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import host_pids, require_root

from gtp5g_op.kernel import workload
from gtp5g_op.trace import rawbuf
from gtp5g_op.trace.watch import WatchOptions, run_watch

INSTANCES = Path("/sys/kernel/tracing/instances")
CLOCK_BOOTTIME = 7


def start_watch(tmp_path: Path, instance: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gtp5g_op", "watch", "--json", "--instance", instance, *extra]
    env = {**os.environ, "GTP5G_OP_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 15
    while not (INSTANCES / instance / "per_cpu").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"watch did not create its instance: {proc.communicate()[1].decode()[-1500:]}")
        time.sleep(0.05)
    time.sleep(0.5)  # its reader is polling
    return proc


def finish(proc: subprocess.Popen) -> tuple[dict, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out), err.decode()


def by_pid(report: dict) -> dict[int, dict]:
    return {p["pid"]: p for p in report["processes"]}


@host_pids
def test_raw_and_text_watches_see_the_same_events(selftest_probe, tmp_path):
    """Two watches of the same kernel events, one per read mode: the raw one names every thread from
    /proc, counts every event the text one counts (at least the 2 lines per call the load made), and
    validates and keeps the process after it exited."""
    base = f"gtp5g-op-rawtwin-{os.getpid()}"
    raw = start_watch(tmp_path, base + "-raw", "--read-mode", "raw")
    text = start_watch(tmp_path, base + "-text", "--read-mode", "text")
    try:
        with workload.start("nr-gnb", threads=2, rate=300) as wl:
            time.sleep(2.0)
        calls = wl.calls  # per thread, after it stopped
        time.sleep(0.5)  # the last batch
    finally:
        raw_report, raw_err = finish(raw)
        text_report, _ = finish(text)
    assert raw_report["reader"]["mode"] == "raw" and text_report["reader"]["mode"] == "text"
    assert raw_report["reader"]["bad"] == 0 and raw_report["reader"]["events"] > 0
    for report in (raw_report, text_report):
        assert report["stats"]["lost_events"] == 0 and report["stats"]["overruns"] == 0
        assert report["stats"]["malformed"] == 0
    got, want = by_pid(raw_report), by_pid(text_report)
    for tid, n in calls.items():
        assert got[tid]["comm"] == "nr-gnb" and got[tid]["valid"] is True and got[tid]["exited"] is True
        assert got[tid]["events"] == want[tid]["events"] >= 2 * n, (tid, n, got[tid], want[tid])
        assert set(got[tid]["hooks"]) == set(want[tid]["hooks"]) == {"selftest/sys_enter_getppid",
                                                                    "selftest/sys_exit_getppid"}
        # each instance stamps its own copy: the same events, microseconds apart (the boot clock)
        assert abs(got[tid]["first_seen"] - want[tid]["first_seen"]) < 0.01
        assert abs(got[tid]["last_seen"] - want[tid]["last_seen"]) < 0.01
    assert not (INSTANCES / (base + "-raw")).exists() and not (INSTANCES / (base + "-text")).exists()


class Burst(threading.Thread):
    """A thread named ``comm`` that calls getppid ``calls`` times as fast as it can when told, then lives
    on for ``linger`` seconds (its name is read from /proc while the watch reads its lines)."""

    def __init__(self, comm: str, calls: int, linger: float = 1.5):
        super().__init__(daemon=True)
        self.comm, self.calls, self.linger = comm, calls, linger
        self.go, self.named, self.done = threading.Event(), threading.Event(), threading.Event()
        self.tid = 0

    def run(self) -> None:
        ctypes.CDLL(None).prctl(15, self.comm.encode(), 0, 0, 0)  # PR_SET_NAME: this thread's comm
        self.tid = threading.get_native_id()
        self.named.set()
        self.go.wait()
        for _ in range(self.calls):
            os.getppid()
        self.done.set()
        time.sleep(self.linger)


@host_pids
def test_lost_events_are_counted_exactly_through_a_raw_watch(selftest_probe, tmp_path):
    """A tiny buffer (4 KiB per CPU) and a burst of 20 000 calls between two reads: what was not read is
    counted lost, to the event, and equals the kernel's overrun counter."""
    comm = f"rawb{os.getpid()}"[:15]
    burst = Burst(comm, 20000)
    burst.start()
    burst.named.wait(5)
    instance = f"gtp5g-op-rawlost-{os.getpid()}"
    watch = start_watch(tmp_path, instance, "--read-mode", "raw", "--buffer-kb", "4", "--match", f"^{comm}$")
    try:
        # only our thread's lines in this instance: others' probes cannot blur the count
        (INSTANCES / instance / "events/bpf_trace/bpf_trace_printk/filter").write_text(f"common_pid == {burst.tid}\n")
        time.sleep(0.3)
        burst.go.set()
        assert burst.done.wait(30)
        time.sleep(1.0)
    finally:
        report, _ = finish(watch)
    st, reader = report["stats"], report["reader"]
    assert st["lost_events"] > 0, "the burst fitted in the buffer: nothing to count"
    assert reader["bad"] == 0
    if reader["lost_unknown"] == 0:
        assert st["matched"] + st["lost_events"] == 2 * burst.calls, st
        assert st["lost_events"] == st["overruns"], (st, reader)
    else:  # a page too full to hold its loss count: the overrun counter has it
        assert st["matched"] + st["lost_events"] < 2 * burst.calls <= st["matched"] + st["overruns"]


def test_raw_timestamps_are_the_boot_clock_of_the_event(selftest_probe):
    """The pid-reuse check compares a line's time with a process's start time (CLOCK_BOOTTIME): a raw
    line's time is when the call happened, not when it was read."""
    from gtp5g_op.trace.parser import parse_line
    from gtp5g_op.trace.tracefs import TraceInstance

    with TraceInstance(f"gtp5g-op-rawclock-{os.getpid()}", state_dir=None) as inst:
        (inst.path / "events/bpf_trace/bpf_trace_printk/filter").write_text(
            f"common_pid == {threading.get_native_id()}\n")
        reader = rawbuf.RawReader(inst.path, threading.Event(), batch_seconds=0)
        try:
            before = time.clock_gettime(CLOCK_BOOTTIME)
            os.getppid()
            after = time.clock_gettime(CLOCK_BOOTTIME)
            time.sleep(0.5)  # read well after the call
            text, _ = reader._drain()
        finally:
            reader.close()
    events = [parse_line(line) for line in text.splitlines()]
    mine = [e for e in events if e and e.pid == threading.get_native_id()]
    assert len(mine) == 2
    for ev in mine:
        assert before - 1e-6 <= ev.timestamp <= after + 1e-6, (before, ev.timestamp, after)


def run_in_process(tmp_path: Path, **kw) -> dict:
    opts = WatchOptions(instance=f"gtp5g-op-rawmode-{os.getpid()}", state_dir=tmp_path / "state", duration=0.5, **kw)
    return run_watch(opts).report


@host_pids
def test_auto_reads_raw_and_falls_back_to_text_with_one_line(tmp_path, monkeypatch, caplog):
    require_root("tracefs needs root")
    assert run_in_process(tmp_path)["reader"]["mode"] == "raw"
    assert run_in_process(tmp_path, validate=False)["reader"]["mode"] == "text"  # nothing could name the tasks
    assert run_in_process(tmp_path, read_mode="text")["reader"]["mode"] == "text"

    assert run_in_process(tmp_path, accelerate=False)["reader"]["mode"] == "raw"  # the Python decoder, asked for
    monkeypatch.setattr(rawbuf, "best_decoder", lambda accelerate=True: (rawbuf.decode_py, False))
    with caplog.at_level(logging.INFO, logger="gtp5g_op.trace.watch"):
        assert run_in_process(tmp_path)["reader"]["mode"] == "text"  # C not built: text is cheaper
    assert "the C ring-buffer decoder is not built" in caplog.text
    caplog.clear()
    monkeypatch.undo()

    def unknown(_path):
        raise rawbuf.RawUnavailable("events/header_event describes an event header this reader does not know")

    monkeypatch.setattr(rawbuf, "read_format", unknown)
    with caplog.at_level(logging.INFO, logger="gtp5g_op.trace.watch"):
        assert run_in_process(tmp_path)["reader"]["mode"] == "text"
    said = [r.getMessage() for r in caplog.records if r.name == "gtp5g_op.trace.watch"]
    assert said == ["reading the text trace_pipe: events/header_event describes an event header this reader "
                    "does not know"]
    from gtp5g_op.errors import EnvironmentProblem

    with pytest.raises(EnvironmentProblem, match="cannot read the ring buffers"):
        run_in_process(tmp_path, read_mode="raw")
    assert not (INSTANCES / f"gtp5g-op-rawmode-{os.getpid()}").exists()


@pytest.mark.parametrize("argv, says", [
    (["--read-mode", "raw", "--no-validate"], "--read-mode raw needs validation"),
    (["--read-mode", "text", "--replay"], "--read-mode sets up the private tracefs instance, which --replay"),
    (["--read-mode", "raw", "--trace-pipe", "/dev/null"], "--read-mode sets up the private tracefs instance"),
    (["--read-mode", "binary"], "'binary' is not one of"),
])
def test_read_mode_misuse_is_one_line_and_exit_2(argv, says):
    res = subprocess.run([sys.executable, "-m", "gtp5g_op", "watch", "--duration", "0.1", *argv],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert says in res.stderr and res.stdout == ""
