"""Shared fixtures. Tests that need root, BPF or tracefs skip with the reason elsewhere and run in CI here."""

from __future__ import annotations

import errno
import os
import shutil
import struct
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


def btf_blob(funcs: list[tuple[str, int]], base_str_len: int = 0) -> bytes:
    """A minimal BTF blob: one INT, one FUNC_PROTO, then FUNC records (name, linkage)."""
    strings = b"\0int\0"
    offsets = {}
    for name, _ in funcs:
        offsets[name] = len(strings)
        strings += name.encode() + b"\0"
    types = struct.pack("<III", base_str_len + 1, 1 << 24, 4) + struct.pack("<I", 32)  # INT
    types += struct.pack("<III", 0, (13 << 24) | 1, 1) + struct.pack("<II", 0, 1)  # FUNC_PROTO(int)
    for name, linkage in funcs:
        types += struct.pack("<III", base_str_len + offsets[name], (12 << 24) | linkage, 2)
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


def fake_loaded_gtp5g(root: Path, kallsyms: str, btf_globals: list[str], users: int = 0) -> tuple[Path, Path]:
    """A /proc and a /sys with gtp5g loaded; a test double, since gtp5g cannot be loaded on this machine.

    ``btf_globals`` become global FUNCs in /sys/kernel/btf/gtp5g, split against a one-function vmlinux.
    """
    proc, sys_root = root / "proc", root / "sys"
    (sys_root / "module/gtp5g/holders").mkdir(parents=True)
    (sys_root / "kernel/btf").mkdir(parents=True)
    proc.mkdir()
    (proc / "modules").write_text(f"gtp5g 151552 {users} - Live 0x0\n")
    (proc / "kallsyms").write_text(kallsyms)
    base = btf_blob([("schedule", 1)])
    (sys_root / "kernel/btf/vmlinux").write_bytes(base)
    base_str_len = struct.unpack_from("<I", base, 20)[0]  # header: str_len
    (sys_root / "kernel/btf/gtp5g").write_bytes(btf_blob([(n, 1) for n in btf_globals], base_str_len))
    return proc, sys_root


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="module")
def selftest_probe(tmp_path_factory):
    """The selftest tracepoint programs (tracer/selftest.bpf.c), attached for the test module."""
    require_root("loading BPF programs and reading tracefs")
    if not shutil.which("clang") or not shutil.which("bpftool"):
        pytest.skip("clang and bpftool are needed to build the probe (apt-get install clang bpftool)")
    from gtp5g_op.kernel.bpf_loader import BpfObject
    from gtp5g_op.kernel.tracer_build import ensure_built

    obj = ensure_built(tmp_path_factory.mktemp("bpf"))["selftest"]
    with BpfObject(obj) as bpf:
        if not bpf.attached:
            pytest.fail(f"selftest probe did not attach: {[r.error for r in bpf.report]}")
        yield bpf


VM_TIMINGS = pytest.StashKey[dict]()  # step -> seconds, filled by tests/vm/test_vm.py


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Per-step timings of the VM lab run (tests/vm), when it ran."""
    timings = config.stash.get(VM_TIMINGS, None)
    if not timings:
        return
    terminalreporter.section("VM lab timings (seconds)")
    for name, seconds in timings.items():
        terminalreporter.write_line(f"{seconds:8.1f}  {name}")
