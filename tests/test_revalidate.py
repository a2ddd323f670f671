"""Issue 11 item 6 and issue 10 fix (h), with real processes.

* A rejected record used to be kept forever with no create time and never checked again: when its pid
  was reused by an allowed nr-gnb, that process was never pushed. Rejections are now re-checked (on the
  next line for a reused pid, and round-robin on refresh, a bounded number per refresh).
* A validated ``watch --json`` whose sender exited before the end reported ``"processes": []`` with its
  matched lines and no rejection: what was seen now stays in the report, marked ``exited``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import host_pids, open_fifo_writer, require_root, wait_for
from test_pipeline import Recorder, line

from gtp5g_op.kernel import workload
from gtp5g_op.model import Target
from gtp5g_op.trace import pipeline as pipeline_mod
from gtp5g_op.trace.parser import TraceParser
from gtp5g_op.trace.pipeline import Pipeline
from gtp5g_op.trace.validate import ProcessValidator

# Starts with another comm, takes the name nr-gnb when told to (stdin), then idles.
RENAMER = r"""
import sys, threading, time
def name(n):
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write(n)
name("starting")
print("ready", flush=True)
sys.stdin.readline()
name("nr-gnb")
print("renamed", flush=True)
time.sleep(60)
"""


def _set_last_pid(pid: int) -> bool:
    try:
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        return True
    except OSError:
        return False


@host_pids
def test_a_rejected_pid_reused_by_an_allowed_gnb_is_pushed():
    require_root("reusing a pid needs /proc/sys/kernel/ns_last_pid")
    pusher = Recorder()
    pipe = Pipeline(TraceParser(), validator=ProcessValidator(), pusher=pusher)
    for _attempt in range(40):  # other processes on the host may take the pid first: try again
        with workload.start("nr-gnb", threads=0, rate=1, binary=False) as spoofer:  # a renamed python3
            pid = spoofer.pid
            pipe.feed(line(pid, ts=1.0))
            assert pipe.records[(pid, "nr-gnb")].valid is False
            assert pipe.records[(pid, "nr-gnb")].reason_code == "exe"
        if not _set_last_pid(pid):
            pytest.skip("cannot set ns_last_pid here")
        real = workload.start("nr-gnb", threads=1, rate=1)  # the installed stand-in, now with that pid
        if real.pid == pid:
            break
        real.stop()
    else:
        pytest.skip("the host kept taking the pid (busy machine)")
    try:
        pipe.feed(line(pid, ts=2.0))  # the next line about that pid
        assert Target(pid, pid, "nr-gnb") in pusher.sets[-1], "the new nr-gnb behind a rejected pid was not pushed"
        assert {t.pid for t in pipe.targets()} == {pid, *real.ready.tids}
    finally:
        real.stop()


def test_a_rejection_lifts_on_refresh_when_the_process_qualifies_later():
    """Seen under its final name before it took it: rejected (comm), then accepted by a refresh."""
    require_root("runs an installed stand-in binary")
    exe = workload.target_binary("nr-gnb")
    proc = subprocess.Popen([exe, "-c", RENAMER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        pusher = Recorder()
        pipe = Pipeline(TraceParser(), validator=ProcessValidator(), pusher=pusher)
        pipe.feed(line(proc.pid))
        assert pipe.records[(proc.pid, "nr-gnb")].reason_code == "comm" and not pipe.targets()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "renamed"
        pipe.refresh()
        assert Target(proc.pid, proc.pid, "nr-gnb") in pusher.sets[-1]
        assert pipe.records[(proc.pid, "nr-gnb")].valid is True
    finally:
        proc.kill()
        proc.wait()


def test_rechecks_per_refresh_and_rejected_records_are_bounded(monkeypatch):
    """A flood of live spoofers (20 threads named nr-gnb) costs a bounded number of checks per refresh
    and a bounded number of records."""
    require_root("reads other processes' executables")
    monkeypatch.setattr(pipeline_mod, "RECHECKS_PER_REFRESH", 5)
    monkeypatch.setattr(pipeline_mod, "MAX_REJECTED", 8)

    class Counting(ProcessValidator):
        calls = 0

        def check(self, *a, **kw):
            Counting.calls += 1
            return super().check(*a, **kw)

    pipe = Pipeline(TraceParser(), validator=Counting(), threads=False)
    with workload.start("nr-gnb", threads=20, rate=1, binary=False) as spoofer:
        pipe.feed(b"".join(line(tid) for tid in spoofer.ready.tids))
        assert len(pipe.records) == 8 and pipe.rejected == {"exe": 20}
        for _ in range(3):
            Counting.calls = 0
            pipe.refresh()
            assert Counting.calls == 5
        assert not pipe.targets()
    pipe.refresh()  # they exited: rejected records are forgotten
    assert pipe.records == {}


def test_memory_stays_bounded_when_validated_processes_come_and_go(monkeypatch):
    """Exited records are kept for the report, at most MAX_EXITED of them (the oldest go first)."""
    require_root("runs an installed stand-in binary")
    monkeypatch.setattr(pipeline_mod, "MAX_EXITED", 3)
    pipe = Pipeline(TraceParser(), validator=ProcessValidator(), threads=False)
    pids = []
    for _ in range(5):
        with workload.start("nr-ue", threads=0, rate=1) as wl:
            pids.append(wl.pid)
            pipe.feed(line(wl.pid, "nr-ue"))
            assert pipe.targets() == {Target(wl.pid, wl.pid, "nr-ue")}
        assert wait_for(lambda: (pipe.refresh(), not pipe.targets())[1], 5) is not None
    report = pipe.report()
    assert [p["pid"] for p in report["processes"]] == sorted(pids[-3:])
    assert all(p["exited"] and p["valid"] for p in report["processes"]) and report["exited_forgotten"] == 2


@host_pids
def test_watch_json_keeps_a_sender_that_exited_before_the_end(tmp_path):
    """Issue 10 (h): validated watch --json, the sender exits first: it stays in the report, marked exited."""
    require_root("runs an installed stand-in binary")
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    watch = subprocess.Popen([sys.executable, "-m", "gtp5g_op", "watch", "--trace-pipe", str(fifo), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with open_fifo_writer(fifo, watch) as pipe:
            with workload.start("nr-gnb", threads=1, rate=1) as wl:
                for i in range(144):
                    pipe.write(line(wl.pid, ts=1.0 + i / 1000))
                time.sleep(1.5)  # validated while it runs
                sender = wl.pid
            time.sleep(1.5)  # a refresh sees it gone
        out, err = watch.communicate(timeout=20)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, err.decode()[-1500:]
    report = json.loads(out)
    assert report["stats"]["matched"] == 144
    mine = [p for p in report["processes"] if p["pid"] == sender]
    assert mine and mine[0]["events"] == 144 and mine[0]["valid"] is True and mine[0]["exited"] is True
