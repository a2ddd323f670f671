"""tracefs.py against the real tracefs of this host: instances, stale clean-up, tailing pipes, FIFOs, files."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import host_pids, require_root, wait_for

from gtp5g_op.errors import EnvironmentProblem, OpError, UsageError
from gtp5g_op.ops.statedir import default_state_dir
from gtp5g_op.trace.tracefs import (
    MAX_BUFFER_KB,
    TraceInstance,
    cleanup_stale_instances,
    cpu_stats,
    find_tracefs,
    tail,
    trace_clock,
)

_seq = itertools.count()


def lock_file(name: str) -> Path:
    """Where an instance's lock lives: lock/instance-<name> in the default state directory."""
    return default_state_dir() / "lock" / f"instance-{name}"


@pytest.fixture
def name() -> str:
    """An instance name no other test or engineer uses."""
    return f"gtp5g-op-test-{os.getpid()}-{next(_seq)}"


@pytest.fixture
def root() -> Path:
    require_root("tracefs needs root")
    return find_tracefs()


def as_nobody(func) -> str:
    """Run ``func`` in a forked child with uid/gid 65534; return the OpError line it raised, or ''."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        text = ""
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            func()
        except OpError as exc:
            text = exc.one_line()
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            text = f"unexpected {exc!r}"
        os.write(wfd, text.encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def collect(path, stop, **kw) -> tuple[threading.Thread, list[bytes], dict]:
    """Tail ``path`` in a thread; returns the thread, the chunks and a dict with error/cpu/ended."""
    chunks: list[bytes] = []
    info: dict = {}

    def run():
        cpu = time.thread_time()
        try:
            chunks.extend(tail(path, stop, **kw))
        except OpError as exc:
            info["error"] = exc
        info["cpu"] = time.thread_time() - cpu
        info["ended"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, chunks, info


def spawn_owner(name: str) -> subprocess.Popen:
    """A child python that opens instance ``name`` and sleeps; returns once the instance exists."""
    code = textwrap.dedent(f"""
        import sys, time
        from gtp5g_op.trace.tracefs import TraceInstance
        inst = TraceInstance({name!r}).open()
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


# --- finding and mounting tracefs -------------------------------------------------------------------

def test_find_tracefs_returns_a_mounted_tracefs(root):
    assert (root / "trace_pipe").exists()
    assert trace_clock(root) in {"local", "global", "boot", "mono", "mono_raw", "counter", "uptime",
                                 "perf", "tai", "x86-tsc"}


def test_find_tracefs_mounts_it_in_a_fresh_mount_namespace():
    """Unmount tracefs in a private mount namespace only (other users of this host keep theirs)."""
    require_root("mount namespaces need root")
    code = textwrap.dedent("""
        import ctypes, os
        from gtp5g_op.trace.tracefs import find_tracefs, _tracefs_mounts
        from gtp5g_op.errors import EnvironmentProblem
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        while _tracefs_mounts():
            assert libc.umount2(str(_tracefs_mounts()[-1]).encode(), 0) == 0, os.strerror(ctypes.get_errno())
        try:
            find_tracefs(mount=False)
        except EnvironmentProblem as exc:
            print("nomount:", exc.one_line())
        pid = os.fork()
        if pid == 0:
            os.setgid(65534); os.setuid(65534)
            try:
                find_tracefs()
            except EnvironmentProblem as exc:
                print("nobody:", exc.one_line(), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("mounted:", find_tracefs(), (find_tracefs() / "trace_pipe").exists())
    """)
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert "nomount: tracefs is not mounted; fix: mount it: mount -t tracefs nodev /sys/kernel/tracing" \
        in out.stdout
    assert "nobody:" in out.stdout and "run as root or grant CAP_SYS_ADMIN" in out.stdout
    assert "mounted: /sys/kernel/tracing True" in out.stdout
    assert (find_tracefs() / "trace_pipe").exists()  # ours is untouched


def test_non_root_gets_one_line_with_the_fix(root):
    line = as_nobody(find_tracefs)
    assert "not readable by uid 65534" in line and "CAP_SYS_ADMIN" in line


# --- instances -------------------------------------------------------------------------------------

def test_instance_is_created_configured_and_removed(root, name):
    with TraceInstance(name, buffer_kb=64, record_tgid=True) as inst:
        path = root / "instances" / name
        assert inst.path == path and inst.pipe == path / "trace_pipe"
        assert (path / "events/bpf_trace/bpf_trace_printk/enable").read_text().strip() == "1"
        assert 64 <= int((path / "buffer_size_kb").read_text()) < 128  # the kernel rounds up to pages
        assert (path / "options/record-tgid").read_text().strip() == "1"
        assert trace_clock(path) == "boot"
        assert lock_file(name).read_text().strip() == str(os.getpid())
        assert inst.overruns() == 0
    assert not path.exists()
    assert not lock_file(name).exists()
    inst.remove()  # twice is fine


def test_instance_pipe_carries_lines_written_to_it(root, name):
    stop = threading.Event()
    with TraceInstance(name) as inst:
        t, chunks, info = collect(inst.pipe, stop)
        (inst.path / "trace_marker").write_text("hello from the test\n")
        deadline = time.monotonic() + 5
        while b"hello from the test" not in b"".join(chunks) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        t.join(2)
        assert not t.is_alive()
    assert b"tracing_mark_write: hello from the test\n" in b"".join(chunks)
    assert "error" not in info


def test_a_live_owner_is_refused_with_instance_hint(root, name):
    with TraceInstance(name), pytest.raises(EnvironmentProblem) as exc:
        TraceInstance(name).open()
    assert f"in use by pid {os.getpid()}" in exc.value.message
    assert "--instance NAME" in exc.value.fix


def test_owner_in_another_process_is_refused_then_stale_instance_is_replaced(root, name):
    proc = spawn_owner(name)
    try:
        with pytest.raises(EnvironmentProblem, match=f"in use by pid {proc.pid}"):
            TraceInstance(name).open()
        assert cleanup_stale_instances(name) == []  # a live run's instance is left alone
    finally:
        proc.send_signal(signal.SIGKILL)  # a killed run cannot clean up
        proc.wait()
    path = root / "instances" / name
    assert path.exists()
    with TraceInstance(name) as inst:  # stale: removed and recreated
        assert (path / "events/bpf_trace/bpf_trace_printk/enable").read_text().strip() == "1"
        assert inst.path == path
    assert not path.exists()


def test_cleanup_stale_instances_removes_only_unowned_ones(root, name):
    dead = spawn_owner(f"{name}-dead")
    dead.kill()
    dead.wait()
    live = spawn_owner(f"{name}-live")
    try:
        assert cleanup_stale_instances(name) == [f"{name}-dead"]
        assert (root / "instances" / f"{name}-live").exists()
    finally:
        live.kill()
        live.wait()
    assert cleanup_stale_instances(name) == [f"{name}-live"]


@pytest.mark.parametrize("how", ["exit", "sigint", "sigterm-handler"])
def test_instance_is_removed_on_exit_and_signals(root, name, how):
    code = textwrap.dedent(f"""
        import signal, sys, time
        from gtp5g_op.trace.tracefs import TraceInstance
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))  # what watch does
        inst = TraceInstance({name!r}).open()  # no with-block: atexit must clean up
        print("ready", flush=True)
        if {how!r} != "exit":
            time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert (root / "instances" / name).exists()
    if how == "sigint":
        proc.send_signal(signal.SIGINT)
    elif how == "sigterm-handler":
        proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    assert not (root / "instances" / name).exists()
    assert not lock_file(name).exists()


def test_stale_instance_held_open_gives_the_fix(root, name):
    path = root / "instances" / name
    path.mkdir()  # left by someone, with a reader still attached
    fd = os.open(path / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(EnvironmentProblem) as exc:
            TraceInstance(name).open()
        assert "cannot be removed" in exc.value.message and "fuser" in exc.value.fix
    finally:
        os.close(fd)
        path.rmdir()
    assert not lock_file(name).exists()


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".", ".hidden", "-x", "x" * 65, "sp ace", "name\n", "name\r",
                                 "x\x00", "nr-gnb\x1b[2J", "ünï", 5])
def test_bad_instance_names_are_usage_errors(bad):
    """Issue 11 item 11: `--instance 'name\\n'` passed ("$" instead of "\\Z")."""
    with pytest.raises(UsageError):
        TraceInstance(bad)


def test_overruns_counts_lines_lost_in_a_small_buffer(root, name):
    with TraceInstance(name, buffer_kb=4) as inst:
        with open(inst.path / "trace_marker", "w") as marker:
            for i in range(3000):  # ~300 KB into a 4 KiB-per-CPU buffer, nobody reading
                marker.write(f"line {i:06d} " + "x" * 80 + "\n")
                marker.flush()
        stats = cpu_stats(inst.path)
        assert set(stats) == set(range(os.cpu_count()))
        assert all("overrun" in s and "entries" in s for s in stats.values())
        lost = inst.overruns()
        assert lost == sum(s["overrun"] + s["commit overrun"] + s["dropped events"] for s in stats.values())
        assert 2000 < lost < 3000


@host_pids
def test_syscall_events_of_a_named_workload_arrive_through_the_instance(root, name):
    """Real lines for a real process: the workload's getppid calls, via the syscall tracepoint."""
    from gtp5g_op.kernel import workload

    stop = threading.Event()
    with TraceInstance(name) as inst:
        (inst.path / "events/syscalls/sys_enter_getppid/filter").write_text('common_pid != 0\n')
        (inst.path / "events/syscalls/sys_enter_getppid/enable").write_text("1\n")
        t, chunks, _ = collect(inst.pipe, stop)
        with workload.start("nr-gnb", threads=2, rate=50, thread_name="nr-gnb-w") as wl:
            time.sleep(1.0)
        stop.set()
        t.join(2)
    text = b"".join(chunks).decode()
    for tid in wl.ready.tids:
        assert f"nr-gnb-w-{tid} " in text
    assert "sys_getppid()" in text


# --- tail --------------------------------------------------------------------------------------------

def test_tail_fifo_partial_lines_and_pauses_without_busy_waiting(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    stop = threading.Event()
    t, chunks, info = collect(fifo, stop)
    time.sleep(0.5)  # no writer yet: tail waits instead of seeing EOF
    assert t.is_alive() and chunks == []
    with open(fifo, "wb", buffering=0) as w:
        w.write(b"nr-gnb-1 [000] ..... 1.0: bpf_trace_printk: par")
        time.sleep(0.6)
        w.write(b"tial\nsecond line\n")
        time.sleep(0.6)
    t.join(2)
    assert not t.is_alive(), "tail must end when the FIFO's writer closes"
    assert b"".join(chunks) == b"nr-gnb-1 [000] ..... 1.0: bpf_trace_printk: partial\nsecond line\n"
    assert len(chunks) >= 2
    assert info["cpu"] < 0.15, f"tail used {info['cpu']:.3f} s CPU over ~1.7 s of mostly idle wall time"


def _writer(fifo: Path, lines: int, gap: float) -> threading.Thread:
    def run() -> None:
        with open(fifo, "wb", buffering=0) as w:
            for i in range(lines):
                w.write(b"line %d\n" % i)
                time.sleep(gap)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_tail_batches_reads_without_losing_bytes(tmp_path):
    """batch_seconds: one chunk per window instead of one per write, every byte kept, order kept."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    expected = b"".join(b"line %d\n" % i for i in range(60))
    got = {}
    for batch in (0.0, 0.25):
        stop = threading.Event()
        t, chunks, _ = collect(fifo, stop, batch_seconds=batch)
        _writer(fifo, 60, 0.01).join(5)
        t.join(3)
        assert b"".join(chunks) == expected
        got[batch] = len(chunks)
    assert got[0.0] >= 30  # about one chunk per write
    assert got[0.25] <= 6  # about 0.7 s of writes in 0.25 s windows


def test_tail_batch_bounds_the_first_line_delay_and_size(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    stop = threading.Event()
    arrivals: list[tuple[float, int]] = []

    def run() -> None:
        for chunk in tail(fifo, stop, batch_seconds=0.2, batch_bytes=64):
            arrivals.append((time.monotonic(), len(chunk)))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    with open(fifo, "wb", buffering=0) as w:
        sent = time.monotonic()
        w.write(b"x" * 10 + b"\n")
        assert wait_for(lambda: arrivals, 2.0) is not None
        assert arrivals[0][0] - sent < 0.6  # at most the window, plus slack for a loaded host
        w.write(b"y" * 200)
    t.join(3)
    assert sum(n for _, n in arrivals) == 211 and max(n for _, n in arrivals) <= 64


def test_tail_honours_stop_quickly(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    stop = threading.Event()
    t, _, info = collect(fifo, stop)
    w = os.open(fifo, os.O_WRONLY)  # a writer that never writes
    try:
        time.sleep(0.3)
        asked = time.monotonic()
        stop.set()
        t.join(2)
        assert info["ended"] - asked < 0.6  # poll wakes every 0.2 s; slack for a loaded 2-core host
    finally:
        os.close(w)


def test_tail_stop_on_an_idle_trace_pipe(root, name):
    stop = threading.Event()
    with TraceInstance(name) as inst:
        t, _, info = collect(inst.pipe, stop)
        time.sleep(0.5)
        assert t.is_alive()  # a trace pipe never ends by itself
        asked = time.monotonic()
        stop.set()
        t.join(2)
        assert info["ended"] - asked < 0.6  # poll wakes every 0.2 s; slack for a loaded 2-core host
        assert info["cpu"] < 0.1


def test_tail_regular_file_ends_at_eof_or_follows(tmp_path):
    path = tmp_path / "trace.txt"
    path.write_bytes(b"a\nb\npartial")
    assert b"".join(tail(path, threading.Event(), chunk=3)) == b"a\nb\npartial"

    stop = threading.Event()
    t, chunks, _ = collect(path, stop, follow=True)
    time.sleep(0.3)
    with open(path, "ab") as f:
        f.write(b" line\n")
    deadline = time.monotonic() + 3
    while b"".join(chunks) != b"a\nb\npartial line\n" and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join(2)
    assert b"".join(chunks) == b"a\nb\npartial line\n"


def test_tail_fifo_follow_takes_new_writers_and_fails_when_the_fifo_goes(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    stop = threading.Event()
    t, chunks, info = collect(fifo, stop, follow=True)
    for text in (b"one\n", b"two\n"):
        with open(fifo, "wb") as w:
            w.write(text)
        time.sleep(0.4)
    assert t.is_alive()
    assert b"".join(chunks) == b"one\ntwo\n"
    with open(fifo, "wb") as w:
        fifo.unlink()  # the pipe disappears while a writer is attached
        w.write(b"three\n")
    t.join(2)
    assert not t.is_alive()
    assert b"".join(chunks) == b"one\ntwo\nthree\n"
    assert isinstance(info["error"], EnvironmentProblem)
    assert "disappeared" in info["error"].message and "mkfifo" in info["error"].fix


def test_tail_missing_path_is_an_environment_problem(tmp_path):
    with pytest.raises(EnvironmentProblem) as exc:
        next(tail(tmp_path / "nope", threading.Event()))
    assert "does not exist" in exc.value.message and "--trace-pipe" in exc.value.fix


def test_tail_permission_denied_names_the_fix(tmp_path):
    require_root("needs root to drop to another uid")
    path = tmp_path / "secret"
    path.write_bytes(b"x\n")
    path.chmod(0o600)
    tmp_path.chmod(0o755)
    line = as_nobody(lambda: next(tail(path, threading.Event())))
    assert "permission denied reading" in line and "CAP_SYS_ADMIN" in line


def test_cli_refuses_an_instance_name_with_a_newline():
    from click.testing import CliRunner

    from gtp5g_op.cli import main

    out = CliRunner().invoke(main, ["watch", "--instance", "gtp5g-op\n", "--duration", "0.1"])
    assert out.exit_code == 2 and "bad tracefs instance name 'gtp5g-op\\n'" in out.output


def test_a_buffer_no_host_can_mean_is_refused_before_tracefs_is_touched(root, name):
    """``--buffer-kb 99999999999`` reached the kernel (per CPU!), which answered ENOMEM: exit 3 and
    "Cannot allocate memory (None)"; a value just under the host's memory would have been taken."""
    from click.testing import CliRunner

    from gtp5g_op.cli import main

    out = CliRunner().invoke(main, ["watch", "--instance", name, "--buffer-kb", "99999999999", "--duration", "1"])
    assert out.exit_code == 2 and "--buffer-kb" in out.output and "1048576" in out.output, out.output
    assert not (root / "instances" / name).exists()
    with pytest.raises(UsageError, match="1048576"):
        TraceInstance(name, buffer_kb=MAX_BUFFER_KB + 1)


def test_a_setting_the_kernel_refuses_is_named_in_the_error(root, name, tmp_path):
    with pytest.raises(EnvironmentProblem) as exc:
        TraceInstance(name, clock="no-such-clock", state_dir=tmp_path / "state").open()
    line = exc.value.one_line()
    assert "trace_clock" in line and "None" not in line, line
    assert not (root / "instances" / name).exists()
