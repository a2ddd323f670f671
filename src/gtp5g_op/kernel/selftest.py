"""Prove the live-tracing path end to end on any host, with no gtp5g and no fentry support needed.

The selftest probe (``tracer/selftest.bpf.c``) prints lines in the tracer's own format from the
``syscalls/sys_{enter,exit}_getppid`` tracepoints. A thread of this process, named
:data:`TRIGGER_COMM`, calls getppid(2); the line it causes must come out of a private tracefs
instance's pipe and parse (rule 2: ``PID=<thread id>, TGID=<our pid>``) back to that very thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gtp5g_op.errors import OpError
from gtp5g_op.kernel.bpf_loader import BpfObject
from gtp5g_op.kernel.tracer_build import ensure_built
from gtp5g_op.trace.parser import Event, parse_line
from gtp5g_op.trace.tracefs import TraceInstance, tail
from gtp5g_op.trace.validate import HOST_PID_NS, require_host_pid_namespace

log = logging.getLogger(__name__)

TRIGGER_COMM = "gtp5g-op-st"  # at most 15 bytes: the kernel's comm length
ENTER_HOOK = "selftest/sys_enter_getppid"
EXIT_HOOK = "selftest/sys_exit_getppid"
PR_SET_NAME = 15
STEPS = ("build", "load", "attach", "printk line in instance pipe", "parsed subject matches")


@dataclass
class Step:
    name: str
    ok: bool | None  # None: not run because an earlier step failed
    detail: str = ""


@dataclass
class SelftestResult:
    steps: list[Step] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # the probe's lines about the trigger thread

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "steps": [asdict(s) for s in self.steps], "lines": self.lines}


class _Trigger(threading.Thread):
    """A thread named TRIGGER_COMM that calls getppid(2) every ``interval`` until stopped."""

    def __init__(self, interval: float = 0.05):
        super().__init__(name=TRIGGER_COMM, daemon=True)
        self.interval = interval
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.calls = 0

    def run(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, TRIGGER_COMM.encode(), 0, 0, 0)  # the task column's comm
        self.ready.set()
        while not self.stop.is_set():
            os.getppid()
            self.calls += 1
            self.stop.wait(self.interval)


def _matches(ev: Event, tid: int) -> bool:
    return ev.hook in (ENTER_HOOK, EXIT_HOOK) and ev.pid == tid


def _check_event(ev: Event, tid: int) -> str:
    """Empty when the parsed line names the trigger thread exactly, else what differs."""
    want = {"subject_pid": tid, "subject_tgid": os.getpid(), "subject_comm": TRIGGER_COMM, "rule": 2}
    wrong = [f"{k}={getattr(ev, k)!r} (want {v!r})" for k, v in want.items() if getattr(ev, k) != v]
    if ev.hook == EXIT_HOOK and f"RET={os.getppid()}" not in ev.message:
        wrong.append(f"message {ev.message!r} lacks RET={os.getppid()}")
    return ", ".join(wrong)


def _read_lines(pipe: Path, tid: int, timeout: float) -> list[tuple[bytes, Event]]:
    """The probe's lines about thread ``tid`` (one enter, one exit) and their parse, within ``timeout``."""
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    found: dict[str, tuple[bytes, Event]] = {}
    rest = b""
    try:
        for chunk in tail(pipe, stop):
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                ev = parse_line(line)
                if ev is not None and _matches(ev, tid):
                    found.setdefault(ev.hook or "", (line, ev))
            if len(found) == 2:
                break
    finally:
        timer.cancel()
    return list(found.values())


def run_selftest(obj: str | os.PathLike | None = None, build_dir: str | os.PathLike | None = None,
                 timeout: float = 5.0, instance: str = "gtp5g-op-selftest") -> SelftestResult:
    """Build (unless ``obj`` is given), load and attach the selftest probe, trigger it, read and parse.

    Failures become failed steps, not exceptions, except host problems raised as ``OpError``
    (e.g. no tracefs or not root) before anything was loaded.
    """
    require_host_pid_namespace(HOST_PID_NS)  # the probe prints host pids; the trigger knows only its own
    result = SelftestResult()
    steps = iter(STEPS)

    def step(ok: bool, detail: str = "") -> bool:
        result.steps.append(Step(next(steps), ok, detail))
        return ok

    def skip_rest() -> SelftestResult:
        result.steps.extend(Step(name, None, "skipped") for name in steps)
        return result

    try:
        path = Path(obj) if obj else ensure_built(build_dir)["selftest"]
    except OpError as exc:
        step(False, exc.one_line())
        return skip_rest()
    step(path.is_file(), str(path))
    with TraceInstance(instance) as trace, BpfObject(path) as probe:
        report = probe.report
        failed = [f"{r.name}: {r.error}" for r in report if not r.loaded]
        if not step(not failed, "; ".join(failed) or f"{len(report)} programs loaded"):
            return skip_rest()
        failed = [f"{r.name}: {r.error}" for r in report if not r.attached]
        if not step(not failed, "; ".join(failed) or ", ".join(r.function for r in report)):
            return skip_rest()
        trigger = _Trigger()
        trigger.start()
        trigger.ready.wait(1.0)
        try:
            tid = trigger.native_id or 0
            started = time.monotonic()
            lines = _read_lines(trace.pipe, tid, timeout)
        finally:
            trigger.stop.set()
            trigger.join()
        result.lines = [line.decode(errors="backslashreplace") for line, _ in lines]
        seen = f"{len(lines)} of 2 lines for thread {tid} in {(time.monotonic() - started) * 1000:.0f} ms"
        if not step(len(lines) == 2, f"{seen} ({trigger.calls} getppid calls; pipe {trace.pipe})"):
            return skip_rest()
        problems = [p for p in (_check_event(ev, tid) for _, ev in lines) if p]
        step(not problems, "; ".join(problems)
             or f"PID={tid} TGID={os.getpid()} comm={TRIGGER_COMM} RET={os.getppid()}")
    return result
