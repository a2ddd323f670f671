"""End to end on the real kernel: a BPF tracepoint probe prints in the tracer's format, a real process
named nr-gnb with 3 named threads triggers it, ``gtp5g-op watch --push`` reads its private tracefs
instance, validates with psutil and pushes to the Gthulhu test server (a real HTTP process).

Only the fentry attach to gtp5g is out of reach here (no modules, fentry refused); the selftest probe
(``tracer/selftest.bpf.c``) prints the same line format from ``syscalls/sys_enter_getppid``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import host_pids, require_root, wait_for

from gtp5g_op.kernel import workload

INSTANCE_ROOT = Path("/sys/kernel/tracing/instances")


def start_watch(server, tmp_path: Path, instance: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gtp5g_op", "watch", "--push", "--json", "--interval", "1",
           "--api-url", server.url, "--public-key", str(server.public_key), "--instance", instance, *extra]
    env = {**os.environ, "GTP5G_OP_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    pipe = INSTANCE_ROOT / instance / "trace_pipe"
    deadline = time.monotonic() + 15
    while not pipe.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"watch did not create its instance: {proc.communicate()[1].decode()[-1500:]}")
        time.sleep(0.05)
    time.sleep(0.3)  # its reader is polling the pipe
    return proc


def finish(proc: subprocess.Popen) -> dict:
    proc.send_signal(15)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"eyJ" not in out + err, "a token leaked into the output"
    return json.loads(out)


@host_pids
def test_live_watch_pushes_process_and_threads_then_drops_them(selftest_probe, gthulhu_server, tmp_path):
    instance = "gtp5g-op-e2e"
    watch = start_watch(gthulhu_server, tmp_path, instance)
    try:
        with workload.start("nr-gnb", threads=3, rate=200) as wl:
            t0 = time.monotonic()
            expected = {wl.pid, *wl.ready.tids}
            assert len(expected) == 4
            latency = wait_for(lambda: expected <= gthulhu_server.pids(), timeout=10)
            assert latency is not None, f"not pushed: server has {gthulhu_server.pids()}"
            assert latency < 1.0, f"pushed {latency:.2f} s after the first event"
            # foreign entries stay (the server's default selector strategy)
            assert any(s.get("selectors") for s in gthulhu_server.state()["strategies"])
        gone_after = time.monotonic() - t0
        assert wait_for(lambda: not (expected & gthulhu_server.pids()), timeout=5) is not None
    finally:
        report = finish(watch)
    assert not (INSTANCE_ROOT / instance).exists(), "the private instance was left behind"
    assert report["push"]["final_push_ok"] is True
    assert report["stats"]["matched"] > 0 and report["stats"]["malformed"] == 0
    print(f"pushed {latency:.3f} s after the workload started; workload ran {gone_after:.1f} s")


@host_pids
def test_a_renamed_interpreter_is_rejected_by_default(selftest_probe, gthulhu_server, tmp_path):
    instance = "gtp5g-op-e2e-exe"
    watch = start_watch(gthulhu_server, tmp_path, instance)
    try:
        with workload.start("nr-gnb", threads=3, rate=200, binary=False) as wl:
            expected = {wl.pid, *wl.ready.tids}
            assert wait_for(lambda: expected & gthulhu_server.pids(), timeout=2.5) is None
    finally:
        report = finish(watch)
    assert report["rejected"].get("exe", 0) >= 1
    assert not (expected & gthulhu_server.pids())


@host_pids
def test_exe_allow_accepts_the_real_executable(selftest_probe, gthulhu_server, tmp_path):
    real = os.path.realpath(sys.executable)
    watch = start_watch(gthulhu_server, tmp_path, "gtp5g-op-e2e-ok", "--exe-allow", real)
    try:
        with workload.start("nr-gnb", threads=1, rate=200, binary=False) as wl:
            assert wait_for(lambda: wl.pid in gthulhu_server.pids(), timeout=5) is not None
    finally:
        finish(watch)


@host_pids
def test_with_tracer_says_why_nothing_attached_here(tmp_path):
    """This VM has no gtp5g (no modules) and refuses fentry: one line, exit 3, and no instance left behind."""
    require_root("loading BPF programs and reading tracefs")
    import shutil

    if not shutil.which("clang") or not shutil.which("bpftool"):
        pytest.skip("clang and bpftool are needed to build the tracer (apt-get install clang bpftool)")
    if Path("/sys/kernel/btf/gtp5g").exists():
        pytest.skip("gtp5g is loaded here: the tracer may attach")
    res = subprocess.run([sys.executable, "-m", "gtp5g_op", "watch", "--with-tracer", "--duration", "1",
                          "--instance", "gtp5g-op-e2e-tracer"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert res.returncode == 3
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no gtp5g tracer program attached" in lines[0] and "fix:" in lines[0]
    assert "gtp5g" in lines[0] and "other reasons" not in lines[0]  # all 12 share one reason here
    assert not (INSTANCE_ROOT / "gtp5g-op-e2e-tracer").exists()
