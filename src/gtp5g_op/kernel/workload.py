"""A stand-in traffic process: a process named like a UERANSIM one whose threads call a syscall at a rate.

The tracer's selftest probe fires on a syscall tracepoint, so this gives it a real ``nr-gnb`` (or any
name) with real, named threads to see, and gives the validator real processes to check::

    python -m gtp5g_op.kernel.workload --name nr-gnb --threads 3 --rate 100 --duration 5

Tests use :func:`start`, which runs it as a child process and returns once every thread is named. As
root, :func:`start` runs it from a root-owned copy of the interpreter named like the process (a stand-in
for an installed UERANSIM binary, which the validator's executable rules accept); ``binary=False`` runs
the interpreter itself, renamed, which is what a spoofing user would do.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

import click

from gtp5g_op.cli.common import Number
from gtp5g_op.errors import UsageError, cli_errors

# Syscalls the loop can make; each os function below is one system call per call (glibc caches none).
SYSCALLS: dict[str, Callable[[], object]] = {
    "getppid": os.getppid,
    "getpid": os.getpid,
    "getuid": os.getuid,
    "sched_yield": os.sched_yield,
}
COMM_MAX = 15  # TASK_COMM_LEN - 1: the kernel keeps at most 15 bytes of a task name


def set_thread_name(name: str) -> None:
    """Set the calling thread's kernel comm (for the main thread, the process's name too)."""
    with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write(name)


def check_name(name: str) -> None:
    """Refuse a name the kernel would truncate or mangle."""
    raw = name.encode()
    if not raw or len(raw) > COMM_MAX or b"\n" in raw:
        raise UsageError(f"bad task name {name!r}", f"use 1-{COMM_MAX} bytes without newlines")


@dataclass
class Ready:
    """What a running workload announces once all its threads are named."""

    pid: int
    tids: list[int]
    name: str
    thread_name: str
    syscall: str
    rate: float


def run(name: str, threads: int = 3, rate: float = 100.0, duration: float | None = 5.0,
        syscall: str = "getppid", thread_name: str | None = None, stop: threading.Event | None = None,
        on_ready: Callable[[Ready], None] | None = None) -> dict[int, int]:
    """Rename this process to ``name`` and run ``threads`` threads that each make ``rate`` calls per second.

    Runs for ``duration`` seconds (None: until ``stop`` is set) and returns the calls made per thread id.
    """
    thread_name = thread_name or name
    check_name(name)
    check_name(thread_name)
    if syscall not in SYSCALLS:
        raise UsageError(f"unknown syscall {syscall!r}", f"use one of {', '.join(sorted(SYSCALLS))}")
    if not 0 < rate < float("inf") or threads < 0:
        raise UsageError("--rate must be positive and --threads not negative", "e.g. --threads 3 --rate 100")
    stop = stop or threading.Event()
    call = SYSCALLS[syscall]
    set_thread_name(name)
    counts: dict[int, int] = {}
    started = threading.Barrier(threads + 1)

    def worker() -> None:
        tid = threading.get_native_id()
        set_thread_name(thread_name)
        started.wait()
        interval, done, next_at = 1.0 / rate, 0, time.monotonic()
        while not stop.is_set():
            call()
            done += 1
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            elif delay < -1.0:  # far behind (host overloaded): resume the pace instead of bursting
                next_at = time.monotonic()
        counts[tid] = done

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in workers:
        t.start()
    started.wait()
    if on_ready:
        on_ready(Ready(os.getpid(), [t.native_id for t in workers], name, thread_name, syscall, rate))
    stop.wait(duration)
    stop.set()
    for t in workers:
        t.join()
    return counts


_binaries: dict[str, str] = {}


def target_binary(name: str) -> str | None:
    """A root-owned copy (hard link if possible) of this interpreter named ``name``, in a root-owned 0755
    directory made once per process and removed at exit; None unless root (or for a name with '/')."""
    if os.geteuid() != 0 or "/" in name:
        return None
    if name not in _binaries:
        if not _binaries:
            home = tempfile.mkdtemp(prefix="gtp5g-op-bin-")
            os.chmod(home, 0o755)
            atexit.register(shutil.rmtree, home, True)
            _binaries[""] = home
        path = os.path.join(_binaries[""], name)
        real = os.path.realpath(sys.executable)
        try:
            os.link(real, path)
        except OSError:
            shutil.copy2(real, path)
        _binaries[name] = path
    return _binaries[name]


@dataclass
class Workload:
    """A workload running as a child process (see :func:`start`); stop it with ``stop()`` or ``with``."""

    proc: subprocess.Popen
    ready: Ready
    exe: str  # what it runs: a copy named like it, or the interpreter itself
    calls: dict[int, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.ready.pid

    def stop(self, timeout: float = 10.0) -> dict[int, int]:
        """Ask it to finish (SIGTERM), wait, and return the calls made per thread id."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        for line in out.splitlines():
            doc = json.loads(line)
            if doc.get("event") == "done":
                self.calls = {int(k): v for k, v in doc["calls"].items()}
        return self.calls

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start(name: str = "nr-gnb", threads: int = 3, rate: float = 100.0, duration: float = 0,
          syscall: str = "getppid", thread_name: str | None = None, timeout: float = 10.0,
          binary: bool = True) -> Workload:
    """Run the workload in a child python; return once its threads are named (``duration`` 0: until stopped).

    ``binary``: as root, run it from :func:`target_binary` (an executable named ``name``); otherwise, or
    when false, run this interpreter renamed.
    """
    exe = (target_binary(name) if binary else None) or sys.executable
    cmd = [exe, "-m", "gtp5g_op.kernel.workload", "--json", "--name", name, "--threads", str(threads),
           "--rate", str(rate), "--duration", str(duration), "--syscall", syscall]
    if thread_name:
        cmd += ["--thread-name", thread_name]
    env = None
    if exe != sys.executable:  # the copy is no venv: hand it this interpreter's import path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    timer = threading.Timer(timeout, proc.kill)  # readline below must not hang on a child that never starts
    timer.start()
    try:
        line = proc.stdout.readline() if proc.stdout else ""
    finally:
        timer.cancel()
    if not line:
        proc.wait()
        err = proc.stderr.read().strip() if proc.stderr else ""
        raise RuntimeError(f"workload did not start (exit {proc.returncode}): {err}")
    doc = json.loads(line)
    del doc["event"]
    return Workload(proc, Ready(**doc), os.path.realpath(exe))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--name", default="nr-gnb", show_default=True, help="Process name (comm), at most 15 bytes.")
@click.option("--threads", default=3, show_default=True, type=click.IntRange(min=0),
              help="Worker threads besides the main thread.")
@click.option("--thread-name", default=None, help="Name of the worker threads [default: --name].")
@click.option("--rate", default=100.0, show_default=True, type=Number(0, 1e6), help="Calls per second per thread.")
@click.option("--duration", default=5.0, show_default=True, type=Number(0, 1e9, min_open=False),
              help="Seconds to run; 0 runs until SIGINT/SIGTERM.")
@click.option("--syscall", default="getppid", show_default=True, type=click.Choice(sorted(SYSCALLS)),
              help="Syscall each thread makes (pick the one the probe's tracepoint watches).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: ready, then done.")
@cli_errors
def main(name: str, threads: int, thread_name: str | None, rate: float, duration: float, syscall: str,
         as_json: bool) -> None:
    """Run a process named like a UERANSIM one whose threads call a syscall at a steady rate.

    Use it to try the tracer selftest and the validator without a 5G core: the selftest probe sees the
    syscall, the validator sees a real process with real, named threads.

    \b
    Examples:
      python -m gtp5g_op.kernel.workload --name nr-gnb --threads 3 --rate 100 --duration 5
      python -m gtp5g_op.kernel.workload --name nr-ue --syscall getpid --duration 0   # until Ctrl-C
      python -m gtp5g_op.kernel.workload --name nr-gnb --thread-name sctp-worker --json
    """
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def announce(ready: Ready) -> None:
        if as_json:
            click.echo(json.dumps({"event": "ready", **ready.__dict__}))
        else:
            click.echo(f"{ready.name} pid {ready.pid}, threads {', '.join(map(str, ready.tids))} "
                       f"({ready.thread_name}): {ready.syscall} {ready.rate:g}/s each")

    began = time.monotonic()
    counts = run(name, threads, rate, duration or None, syscall, thread_name, stop, announce)
    seconds = round(time.monotonic() - began, 3)
    if as_json:
        click.echo(json.dumps({"event": "done", "seconds": seconds, "calls": counts}))
    else:
        click.echo(f"done: {sum(counts.values())} {syscall} calls in {seconds} s")


if __name__ == "__main__":
    from gtp5g_op.cli.errorpath import run as run_with_one_error_path

    run_with_one_error_path(main)
