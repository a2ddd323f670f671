"""Issue 11 items 3 (the watch half) and 7: a watch ends within seconds of SIGTERM/SIGINT, its tracefs
instance removed, whatever the API does; the trace pipe is closed before the instance is removed without
help from the garbage collector.

The API here is a real socket on 127.0.0.1 that accepts connections and never says a word: the worst
peer a client can have (the old watch took about 41 s to exit while the API was slow).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import require_root

from gtp5g_op.trace.tracefs import find_tracefs

INSTANCES = Path("/sys/kernel/tracing/instances")


class SilentServer:
    """Accepts every connection and never reads or answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.close()


def start_watch(silent: SilentServer, key: Path, tmp_path: Path, name: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gtp5g_op", "watch", "--push", "--json", "--interval", "1", "--instance", name,
           "--api-url", f"http://127.0.0.1:{silent.port}", "--public-key", str(key)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "GTP5G_OP_STATE_DIR": str(tmp_path / "state")})
    deadline = time.monotonic() + 15
    while not (INSTANCES / name / "trace_pipe").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"watch did not start: {proc.communicate()[1].decode()[-1500:]}")
        time.sleep(0.05)
    assert silent.accepted.wait(10), "the pusher never called the API"
    time.sleep(0.5)  # a push is now in flight against a server that will never answer
    return proc


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT,), (signal.SIGTERM, signal.SIGINT)])
def test_signals_end_the_watch_within_seconds_while_the_api_never_answers(silent, gthulhu_server, tmp_path,
                                                                           signals):
    require_root("tracefs instances need root")
    find_tracefs()
    name = f"gtp5g-op-shutdown-{os.getpid()}-{len(signals)}-{signals[0]}"
    proc = start_watch(silent, gthulhu_server.public_key, tmp_path, name)
    t0 = time.monotonic()
    proc.send_signal(signals[0])
    for sig in signals[1:]:
        time.sleep(0.3)
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=25)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    took = time.monotonic() - t0
    print(f"{[s.name for s in signals]}: exited {took:.2f} s after the first signal")
    assert not (INSTANCES / name).exists(), "the tracefs instance was left behind"
    assert took < (2.0 if len(signals) > 1 else 6.0), f"took {took:.1f} s"
    assert proc.returncode == 0, err.decode()[-1500:]
    report = json.loads(out)
    assert report["push"]["final_push_ok"] is False and report["push"]["pushes_ok"] == 0
    assert b"Traceback" not in err


def test_a_slow_api_does_not_hold_the_final_push(gthulhu_server, tmp_path):
    """The issue's case: pushes work, then the API turns slow (6 s a call); SIGTERM must not wait for it."""
    require_root("tracefs instances need root")
    name = f"gtp5g-op-shutdown-slow-{os.getpid()}"
    cmd = [sys.executable, "-m", "gtp5g_op", "watch", "--push", "--json", "--interval", "60", "--instance", name,
           "--api-url", gthulhu_server.url, "--public-key", str(gthulhu_server.public_key)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "GTP5G_OP_STATE_DIR": str(tmp_path / "state")})
    try:
        deadline = time.monotonic() + 15
        while not gthulhu_server.state()["stats"].get("posts", 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gthulhu_server.state()["stats"].get("posts", 0), gthulhu_server.state()["stats"]
        gthulhu_server.control(fault="slow", slow_seconds=6)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        gthulhu_server.control(fault=None)
    took = time.monotonic() - t0
    print(f"slow API: exited {took:.2f} s after SIGTERM")
    assert not (INSTANCES / name).exists()
    assert took < 5.0, f"took {took:.1f} s"
    assert proc.returncode == 0 and json.loads(out)["push"]["final_push_ok"] is False, err.decode()[-1500:]


def test_the_pipe_is_closed_before_the_instance_goes_even_if_the_reader_object_lives_on(monkeypatch, caplog):
    """Item 7: a reference that outlives the watch (here: every LiveReader kept in a list, with the
    garbage collector off) must not keep the pipe open; the old reader left its tail() generator open,
    so the instance's rmdir failed with EBUSY and the instance stayed."""
    require_root("tracefs instances need root")
    import gc

    from gtp5g_op.trace import tracefs, watch

    kept: list = []

    class KeptReader(watch.LiveReader):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            kept.append(self)

    open_at_rmdir: list[list[str]] = []
    real_rmdir = tracefs._rmdir_instance

    def rmdir(path: Path, wait: float = 1.0) -> None:
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                continue
        open_at_rmdir.append([f for f in fds if f.startswith(str(path))])
        real_rmdir(path, wait=0.2)

    monkeypatch.setattr(watch, "LiveReader", KeptReader)
    monkeypatch.setattr(tracefs, "_rmdir_instance", rmdir)
    name = f"gtp5g-op-gc-{os.getpid()}"
    gc.disable()
    try:
        result = watch.run_watch(watch.WatchOptions(instance=name, duration=0.6, validate=False))
    finally:
        gc.enable()
    assert kept and open_at_rmdir == [[]], open_at_rmdir
    assert not (INSTANCES / name).exists() and "could not remove" not in caplog.text
    assert result.report["stats"]["lines"] >= 0


def test_a_full_queue_does_not_keep_the_reader_alive():
    """The reader thread blocked on a full queue (the main loop stopped taking chunks) still lets go."""
    from gtp5g_op.trace.watch import LiveReader

    closed = threading.Event()

    def chunks():
        try:
            while True:
                yield b"x" * 10
        finally:
            closed.set()

    stop = threading.Event()
    reader = LiveReader(chunks(), stop)
    time.sleep(0.2)  # the queue (256 chunks) is full by now
    assert reader.queue.full()
    reader.close(timeout=2)
    assert not reader.thread.is_alive() and closed.is_set()
