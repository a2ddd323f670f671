"""trace/validate.py against real processes: a child renamed nr-gnb with named threads, kernel threads, dead pids."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from conftest import host_pids, require_root

from gtp5g_op.kernel import workload
from gtp5g_op.model import Target
from gtp5g_op.trace.validate import CLK_TCK, ProcessValidator, in_host_pid_namespace, read_stat


@pytest.fixture(scope="module")
def gnb():
    """A real process named nr-gnb with 3 worker threads named nr-gnb too."""
    with workload.start("nr-gnb", threads=3, rate=20) as wl:
        yield wl


def test_a_live_process_with_the_traced_comm_is_accepted(gnb):
    v = ProcessValidator().check(gnb.pid, "nr-gnb")
    assert v.ok and v.reason == "ok" and v.code == "ok"
    assert v.tgid == gnb.pid and v.comm == "nr-gnb"
    assert v.create_time == pytest.approx(psutil.Process(gnb.pid).create_time(), abs=1e-6)
    assert 0 < v.started_at <= time.clock_gettime(time.CLOCK_BOOTTIME)


def test_a_bare_thread_pid_resolves_to_its_process(gnb):
    validator = ProcessValidator()
    for tid in gnb.ready.tids:
        v = validator.check(tid, "nr-gnb")
        assert v.ok and v.pid == tid and v.tgid == gnb.pid


def test_a_thread_claimed_by_another_process_is_rejected(gnb):
    v = ProcessValidator().check(gnb.ready.tids[0], "nr-gnb", tgid=gnb.pid + 100000)
    assert not v.ok and v.code == "reused" and f"process {gnb.pid}" in v.reason


def test_comm_mismatch_is_rejected(gnb):
    v = ProcessValidator().check(gnb.pid, "nr-ue")
    assert not v.ok and v.code == "comm" and "'nr-gnb'" in v.reason and "'nr-ue'" in v.reason
    assert not ProcessValidator().check(gnb.pid, "nr-gnb-worker").ok  # whole names only


@host_pids
def test_kernel_threads_are_rejected():
    validator = ProcessValidator()
    assert validator.check(2, "kthreadd").code == "kthread"
    kworker = next(p for p in psutil.process_iter(["name"]) if p.info["name"].startswith("kworker/"))
    v = validator.check(kworker.pid, read_stat(kworker.pid).comm)
    assert not v.ok and v.code == "kthread"
    assert validator.check(0, "<idle>").code == "idle"


def test_dead_process_is_rejected_and_not_alive():
    with workload.start("nr-ue", threads=1, rate=5) as wl:
        v = ProcessValidator().check(wl.pid, "nr-ue")
        assert v.ok and ProcessValidator().still_alive(wl.pid, v.create_time)
    validator = ProcessValidator()
    assert validator.check(wl.pid, "nr-ue").code == "dead"
    assert not validator.still_alive(wl.pid, v.create_time)
    assert validator.threads(wl.pid) == []


def test_still_alive_catches_a_different_start_time(gnb):
    validator = ProcessValidator()
    v = validator.check(gnb.pid, "nr-gnb")
    assert validator.still_alive(gnb.pid, v.create_time)
    assert validator.still_alive(gnb.pid, None)
    assert not validator.still_alive(gnb.pid, v.create_time - 1.0)


def test_a_process_that_started_after_the_traced_event_is_a_reused_pid(gnb):
    validator = ProcessValidator()
    started = validator.check(gnb.pid, "nr-gnb").started_at
    assert validator.check(gnb.pid, "nr-gnb", seen_at=started + 0.5).ok  # event after start: the same one
    assert validator.check(gnb.pid, "nr-gnb", seen_at=started).ok
    late = validator.check(gnb.pid, "nr-gnb", seen_at=started - 5)  # event before it existed: pid reused
    assert not late.ok and late.code == "reused" and "after the traced event" in late.reason


def test_trace_timestamps_of_a_boot_clock_instance_compare_exactly_with_start_times():
    """A real trace line's timestamp (instance clock 'boot') against real processes' start times."""
    require_root("tracefs needs root")
    from gtp5g_op.trace.tracefs import TraceInstance

    with workload.start("nr-gnb", threads=1, rate=5) as before, TraceInstance(f"gtp5g-op-test-{os.getpid()}") \
            as inst:
        time.sleep(0.3)
        (inst.path / "trace_marker").write_text("mark\n")
        # Other probes' bpf_printk lines reach this instance too: find our marker, not the last line.
        marks = re.findall(r" (\d+\.\d+): tracing_mark_write: mark$", (inst.path / "trace").read_text(), re.M)
        seen_at = float(marks[-1])
        time.sleep(0.3)
        with workload.start("nr-gnb", threads=1, rate=5) as after:
            validator = ProcessValidator(start_tolerance=0.0)
            assert validator.check(before.pid, "nr-gnb", seen_at=seen_at).ok
            assert validator.check(after.pid, "nr-gnb", seen_at=seen_at).code == "reused"


def test_a_renamed_interpreter_is_no_target_unless_its_path_is_allowed():
    """Renaming a process (prctl, /proc/self/comm) is not enough: the executable must be named like a target."""
    with workload.start("nr-gnb", threads=1, rate=5, binary=False) as wl:
        real = os.path.realpath(sys.executable)
        v = ProcessValidator().check(wl.pid, "nr-gnb")
        assert not v.ok and v.code == "exe" and v.exe == real and "not named like a target" in v.reason
        v = ProcessValidator(exe_allow=["/*/nr-gnb", "/opt/*/nr-ue"]).check(wl.pid, "nr-gnb")
        assert not v.ok and v.code == "exe" and "matches no --exe-allow path" in v.reason
        ok = ProcessValidator(exe_allow=["/opt/x/nr-gnb", real]).check(wl.ready.tids[0], "nr-gnb")
        assert ok.ok and ok.exe == real


def test_an_installed_binary_named_like_the_target_is_accepted(gnb):
    v = ProcessValidator().check(gnb.pid, "nr-gnb")
    assert v.ok and v.exe == gnb.exe and os.path.basename(gnb.exe) == "nr-gnb"
    assert ProcessValidator(exe_allow=[os.path.dirname(gnb.exe) + "/nr-*"]).check(gnb.pid, "nr-gnb").ok


def test_exe_patterns_must_be_absolute_and_match_one_level_per_star():
    from gtp5g_op.errors import UsageError
    from gtp5g_op.trace.validate import exe_matches

    with pytest.raises(UsageError, match="not an absolute path"):
        ProcessValidator(exe_allow=["*/nr-gnb"])
    assert exe_matches("/opt/UERANSIM/build/nr-gnb", "/opt/*/build/nr-gnb")
    assert not exe_matches("/tmp/a/b/nr-gnb", "/tmp/*/nr-gnb")  # fnmatch's * would cross '/'
    assert not exe_matches("/tmp/x/nr-gnb", "/*/nr-gnb")


def test_exe_allow_rejects_an_unreadable_executable(gnb):
    """A non-root validator cannot read root's /proc/<pid>/exe: rejected, with the reason."""
    require_root("needs root to drop to another uid")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            os.setgid(65534)
            os.setuid(65534)
            v = ProcessValidator(exe_allow=["/*"]).check(gnb.pid, "nr-gnb")
            os.write(wfd, f"{v.ok}|{v.code}|{v.reason}".encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd) as f:
        out = f.read()
    os.waitpid(pid, 0)
    assert out == "False|exe|executable unknown (reading it was denied), so it cannot be checked"


def test_threads_lists_every_thread_with_its_current_comm():
    with workload.start("nr-gnb", threads=3, rate=5, thread_name="sctp-worker") as wl:
        validator = ProcessValidator()
        targets = validator.threads(wl.pid)
        assert sorted(targets, key=lambda t: t.pid) == sorted(
            [Target(wl.pid, wl.pid, "nr-gnb")] + [Target(t, wl.pid, "sctp-worker") for t in wl.ready.tids],
            key=lambda t: t.pid)
        for t in targets:  # each thread, seen in the trace or not, validates on its own
            assert validator.check(t.pid, t.comm, wl.pid).ok
        assert not ProcessValidator(threads=False).cover_threads


def test_memory_stays_bounded_under_100k_distinct_pids(gnb):
    """100 k distinct pids, mostly dead, plus live threads over and over through a smaller cache.

    The live set is the workload's own threads plus every process here, so it outnumbers the cache
    even in a container that runs only a handful of processes.
    """
    validator = ProcessValidator(cache_size=2)
    tids = [int(t) for t in os.listdir(f"/proc/{gnb.pid}/task")]
    live = [(tid, read_stat(tid)) for tid in tids] + [(p.pid, read_stat(p.pid)) for p in psutil.process_iter()]
    live = [(pid, st.comm) for pid, st in live if st is not None]
    assert len(live) > 2
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    tracemalloc.start()
    began = time.perf_counter()
    ok = 0
    for i in range(100_000):
        pid = 1 + (i * 7919) % (pid_max - 1)  # distinct: 7919 is prime and does not divide pid_max - 1
        ok += validator.check(pid, "nr-gnb").ok
        if i % 250 == 0:
            for lpid, comm in live:
                validator.check(lpid, comm)
    elapsed = time.perf_counter() - began
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    info = validator.cache_info()
    assert info.currsize <= 2 and info.maxsize == 2
    assert info.misses > 2, "the cache should have had to evict"
    assert peak < 2_000_000, f"peak {peak} bytes"
    print(f"100k checks in {elapsed:.2f} s, peak {peak / 1e3:.0f} kB, cache {info}")


def test_start_time_is_in_clock_ticks_since_boot(gnb):
    st = read_stat(gnb.pid)
    assert st.comm == "nr-gnb" and st.state in "RSD"
    assert st.start_ticks / CLK_TCK == ProcessValidator().check(gnb.pid, "nr-gnb").started_at


# --- the workload helper ----------------------------------------------------------------------------

def test_workload_runs_at_the_asked_rate_and_reports_calls():
    with workload.start("nr-gnb", threads=2, rate=50, duration=1.0) as wl:
        assert len(wl.ready.tids) == 2 and wl.ready.syscall == "getppid"
        wl.proc.wait(10)
    calls = wl.stop()
    assert set(calls) == set(wl.ready.tids)
    assert all(35 <= n <= 60 for n in calls.values()), calls


def test_workload_stops_on_sigterm_before_its_duration():
    wl = workload.start("nr-ue", threads=1, rate=10, duration=60)
    began = time.monotonic()
    calls = wl.stop()
    assert time.monotonic() - began < 2 and wl.proc.returncode == 0
    assert list(calls) == wl.ready.tids


def test_workload_cli_help_and_usage_errors():
    runner = CliRunner()
    out = runner.invoke(workload.main, ["--help"])
    assert out.exit_code == 0 and "Examples:" in out.output and "--syscall" in out.output
    out = runner.invoke(workload.main, ["--name", "a-name-of-16-byt"])  # fails before renaming anything
    assert out.exit_code == 2 and "bad task name" in out.output
    out = runner.invoke(workload.main, ["--syscall", "open"])
    assert out.exit_code == 2


def test_workload_human_output():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "gtp5g_op.kernel.workload", "--name", "nr-gnb", "--threads", "1",
                          "--rate", "20", "--duration", "0.3"], capture_output=True, text=True, timeout=20,
                         check=False)
    assert out.returncode == 0
    assert re.match(r"nr-gnb pid \d+, threads \d+ \(nr-gnb\): getppid 20/s each\ndone: \d+ getppid calls",
                    out.stdout)


def test_set_thread_name_names_only_the_calling_thread():
    names = {}
    ready, done = threading.Event(), threading.Event()

    def live():
        workload.set_thread_name("worker-y")
        names["live"] = threading.get_native_id()
        ready.set()
        done.wait(5)

    t = threading.Thread(target=live)
    t.start()
    ready.wait(5)
    try:
        assert Path(f"/proc/self/task/{names['live']}/comm").read_text().strip() == "worker-y"
        assert Path("/proc/self/comm").read_text().strip() != "worker-y"
    finally:
        done.set()
        t.join()


# --- PID namespaces ---------------------------------------------------------------------------------

def in_own_pid_namespace(*args: str) -> subprocess.CompletedProcess:
    """``python -m gtp5g_op ARGS`` as pid 1 of a new PID namespace with its own /proc, like a container."""
    require_root("unshare --pid needs CAP_SYS_ADMIN")
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is not installed")
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "gtp5g_op", *args],
                          capture_output=True, text=True, timeout=60)


def test_this_host_is_the_host_pid_namespace():
    assert in_host_pid_namespace() == (os.readlink("/proc/self/ns/pid") == f"pid:[{0xEFFFFFFC}]")


def test_live_validation_in_a_container_pid_namespace_is_refused_in_one_line(tmp_path):
    """Trace pids are the host's; below it /proc shows other pids, so validating would reject them all."""
    empty = tmp_path / "empty.trace"
    empty.write_bytes(b"")
    res = in_own_pid_namespace("watch", "--trace-pipe", str(empty), "--duration", "1")
    assert res.returncode == 3 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "own PID namespace" in res.stderr and "hostPID: true" in res.stderr
    res = in_own_pid_namespace("watch", "--trace-pipe", str(empty), "--duration", "1", "--no-validate", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["stats"]["lines"] == 0
    res = in_own_pid_namespace("tracer", "selftest")
    assert res.returncode == 3 and res.stderr.count("\n") == 1 and "own PID namespace" in res.stderr
    res = in_own_pid_namespace("doctor", "--json", "--api-url", "http://127.0.0.1:9")
    pidns = [c for c in json.loads(res.stdout)["checks"] if c["name"] == "PID namespace"]
    assert pidns[0]["status"] == "fail" and "--pid=host" in pidns[0]["fix"]
