"""Shared fixtures. Tests that need root, BPF or tracefs skip with the reason elsewhere and run in CI here."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

pytest_plugins = ["gthulhu_fixtures"]  # the Gthulhu test server fixtures, for every test module

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def require_root(reason: str = "needs root") -> None:
    """Skip the calling test unless it runs as root."""
    if os.geteuid() != 0:
        pytest.skip(f"{reason}: not running as root")


# Trace lines carry the host's pids; in a container's own PID namespace they are not /proc's pids.
host_pids = pytest.mark.skipif(
    os.readlink("/proc/self/ns/pid") != f"pid:[{0xEFFFFFFC}]",
    reason="needs the host's PID namespace (docker --pid=host): trace pids and kernel threads are the host's")


def wait_for(predicate, timeout: float, step: float = 0.02) -> float | None:
    """Seconds until ``predicate()`` held, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def open_fifo_writer(fifo: Path, reader, timeout: float = 10.0):
    """Open ``fifo`` for writing once ``reader`` (a Popen) has it open; fail, not hang, if it exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            _, err = reader.communicate() if reader.poll() is not None else (None, None)
            if err is not None or time.monotonic() > deadline:
                pytest.fail(f"the reader of {fifo} never opened it: {err!r}")
            time.sleep(0.02)
            continue
        os.set_blocking(fd, True)
        return os.fdopen(fd, "wb", buffering=0)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
