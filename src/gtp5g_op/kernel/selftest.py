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

from gtp5g_op.errors import EnvironmentProblem, OpError
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


# --- tracer selftest --gtp5g: the real tracer on the real module, with real GTP-U -------------------------

GTP5G_STEPS = ("gtp5g loaded", "tracer built", "tracer attached", "device and session", "traffic",
               "every attached hook fired", "lines attributed to the gNB", "nothing left behind")
_EXIT_KINDS = ("fexit", "kretprobe")
# Downlink functions that run only when a PDR matches and its FAR forwards (and a QER polices).
NEEDS_SESSION = ("gtp5g_push_header", "gtp5g_xmit_skb_ipv4", "policePacket")


@dataclass
class HookResult:
    """One tracer program during the gtp5g selftest."""

    program: str
    hook: str  # kind/function, as the attach report names it
    attached: bool
    lines: int = 0  # events seen for this hook (N= counts included)
    from_gnb: int = 0  # ... whose PID/TGID is the gNB sender's
    note: str = ""  # why not attached, or why it could not fire

    @property
    def expected(self) -> bool:
        """Attached and exercisable by the selftest's traffic."""
        return self.attached and not self.note


@dataclass
class Gtp5gSelftestResult(SelftestResult):
    hooks: list[HookResult] = field(default_factory=list)
    gnb: dict = field(default_factory=dict)
    version: str | None = None

    def to_dict(self) -> dict:
        return {**super().to_dict(), "version": self.version, "gnb": self.gnb,
                "hooks": [asdict(h) for h in self.hooks]}


def _direction(kind: str) -> str:
    return "exit" if kind in _EXIT_KINDS else "entry"


def _event_key(ev: Event) -> tuple[str, str] | None:
    """(function, entry|exit) of a tracer line, whatever mechanism printed it (fentry, kprobe, ...)."""
    if not ev.hook or "/" not in ev.hook:
        return None
    kind, _, function = ev.hook.partition("/")
    return function, _direction(kind)


def _event_count(ev: Event) -> int:
    """Events a line stands for: aggregated lines carry a count (N=), plain ones one event."""
    count = getattr(ev, "count", None)
    return count if isinstance(count, int) and count > 0 else 1


def _bpf_link_fds() -> int:
    """BPF links this process still holds open (0 once the tracer is detached)."""
    n = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(fd) == "anon_inode:bpf_link":
                n += 1
        except OSError:
            continue
    return n


def run_gtp5g_selftest(obj: str | os.PathLike | None = None, build_dir: str | os.PathLike | None = None,
                       timeout: float = 10.0, packets: int = 20, rate: float = 50.0, enable_qos: bool = False,
                       gnb_name: str = "nr-gnb", instance: str | None = None) -> Gtp5gSelftestResult:
    """Prove that the tracer sees the loaded gtp5g: real device, real session, real GTP-U from a gNB.

    Loads the tracer, creates a throwaway gtp5g device and PDU session in a private network namespace
    (:class:`~gtp5g_op.kernel.gtp5glab.Gtp5gLab`), sends ``packets`` rounds of uplink GTP-U, echo
    requests and downlink IP from a process named ``gnb_name``, and checks every attached hook printed
    lines and that they name that process. ``enable_qos`` turns gtp5g's global QoS switch on for the
    run (restored after) so ``policePacket`` runs; without it that hook is reported as not exercised.
    Everything is removed at the end, also on an exception or KeyboardInterrupt; the last step checks.
    Host problems (not root, no tracefs) raise ``OpError`` before anything is created.
    """
    from gtp5g_op.kernel import gtp5gnl
    from gtp5g_op.kernel.bpf_loader import BpfObject
    from gtp5g_op.kernel.gtp5glab import Gtp5gLab, LabConfig, qos_enabled

    require_host_pid_namespace(HOST_PID_NS)
    result = Gtp5gSelftestResult()

    def step(ok: bool, detail: str = "") -> bool:
        result.steps.append(Step(GTP5G_STEPS[len(result.steps)], ok, detail))
        return ok

    def skip_rest() -> Gtp5gSelftestResult:
        result.steps.extend(Step(name, None, "skipped") for name in GTP5G_STEPS[len(result.steps):-1])
        return result

    def nothing_created() -> Gtp5gSelftestResult:
        skip_rest()
        result.steps.append(Step(GTP5G_STEPS[-1], True, "nothing was created"))
        return result

    if not gtp5gnl.module_loaded():
        if not Path("/proc/modules").exists():
            raise EnvironmentProblem("this kernel has no loadable module support, so gtp5g cannot be loaded here",
                                     fix="run it on the UPF host; without gtp5g use: gtp5g-op tracer selftest")
        raise EnvironmentProblem("gtp5g is not loaded", fix="modprobe gtp5g (or gtp5g-op build module --reload)")
    result.version = gtp5gnl.module_version()
    step(True, f"gtp5g {result.version or '(version unknown)'}")
    try:
        path = Path(obj) if obj else ensure_built(build_dir)["gtp5g"]
    except OpError as exc:
        step(False, exc.one_line())
        return nothing_created()
    step(path.is_file(), str(path))
    name = instance or f"gtp5g-op-st5g-{os.getpid()}"
    lab = Gtp5gLab(LabConfig(tag="st"), require_session=False)
    trace = TraceInstance(name)
    stop = threading.Event()
    counts = _HookCounts()
    reader: threading.Thread | None = None
    inst_path: Path | None = None
    try:
        inst_path = trace.open().path
        with BpfObject(path) as bpf:
            for r in bpf.report:
                result.hooks.append(HookResult(r.name, f"{r.kind}/{r.function}", r.attached,
                                               note="" if r.attached else r.error))
            attached = [h for h in result.hooks if h.attached]
            if not step(bool(attached), f"{len(attached)} of {len(result.hooks)} programs attached"
                        + "".join(f"; {h.program}: {h.note}" for h in result.hooks if not h.attached)):
                return skip_rest()

            def read() -> None:
                rest = b""
                for chunk in tail(trace.pipe, stop):
                    *lines, rest = (rest + chunk).split(b"\n")
                    rest = rest[-_MAX_LINE:]  # a line never ends: keep its tail only
                    for line in lines:
                        ev = parse_line(line)
                        if ev is not None:
                            counts.add(ev)

            reader = threading.Thread(target=read, name="st5g-reader", daemon=True)
            reader.start()
            try:
                lab.__enter__()
            except OpError as exc:
                step(False, exc.one_line())
                return skip_rest()
            qos = qos_enabled()
            if enable_qos and not qos and not lab.session_error:
                qos = lab.enable_qos()
            where = f"netns {lab.config.netns}, device {lab.config.device}; "
            step(not lab.session_error, where + (
                f"no session: {lab.session_error}; the hooks that need one are not exercised"
                if lab.session_error else "; ".join(f"{r.kind} {r.id}: {r.detail}" for r in lab.rules)))
            gnb = lab.start_gnb(count=packets, rate=rate, name=gnb_name)
            counts.gnb_pid = gnb.pid
            result.gnb = {"pid": gnb.pid, "name": gnb_name, **gnb.wait(timeout=packets / rate + timeout)}
            sent, received, errors = result.gnb["sent"], result.gnb["received"], result.gnb["errors"]
            step(all(v == packets for v in sent.values()) and not errors,
                 f"{gnb_name} pid {gnb.pid} sent {sent['uplink_gpdu']} uplink G-PDUs, {sent['echo_request']} "
                 f"echo requests, {sent['downlink_ip']} downlink IP; got back {received['downlink_gpdu']} "
                 f"downlink G-PDUs, {received.get('echo_response', 0)} echo responses"
                 + (f"; errors: {'; '.join(errors)}" if errors else ""))
            for h in result.hooks:
                function = h.hook.partition("/")[2]
                if h.attached and lab.session_error and function in NEEDS_SESSION:
                    h.note = "not exercised: gtp5g refused the session (see the step above)"
                elif h.attached and function == "policePacket" and not qos:
                    h.note = ("not exercised: gtp5g's QoS is off (/proc/gtp5g/qos); "
                              "pass --enable-qos to turn it on for the test")
            _wait_for_hooks(result.hooks, counts, stop, timeout)
            bpf.flush(force=True)  # every count held back since each hook's first line
            _wait_until_quiet(counts, stop)
            stop.set()
            reader.join(timeout=2)
            counts.tally(result.hooks)
            silent = [h.hook for h in result.hooks if h.expected and h.lines == 0]
            fired = [h for h in result.hooks if h.expected]
            step(not silent, f"silent: {', '.join(silent)}" if silent else
                 ", ".join(f"{h.hook} {h.lines}" for h in fired)
                 + "".join(f"; {h.hook}: {h.note}" for h in result.hooks if h.attached and h.note))
            others = [h.hook for h in fired if h.lines and not h.from_gnb]
            step(not others, f"no line names pid {gnb.pid} for: {', '.join(others)}" if others else
                 f"{sum(h.from_gnb for h in fired)} of {sum(h.lines for h in fired)} events name "
                 f"{gnb_name} (PID/TGID {gnb.pid})")
    finally:
        stop.set()
        lab.close()
        if reader is not None:
            reader.join(timeout=2)
        trace.remove()
        left = lab.leftovers()
        if inst_path is not None and inst_path.exists():
            left.append(f"tracefs instance {name}")
        if _bpf_link_fds():
            left.append(f"{_bpf_link_fds()} BPF link(s)")
        result.steps.append(Step(GTP5G_STEPS[-1], not left, "left: " + ", ".join(left) if left else
                                 "device, session, namespace, tracefs instance and BPF links removed"))
    return result


_MAX_LINE = 1 << 16


class _HookCounts:
    """Events per (function, entry|exit): all, and those naming the gNB (its pid is set once it runs).

    Counters, not lines: on a busy UPF host the tracer's hooks also fire for the real traffic.
    """

    def __init__(self) -> None:
        self.gnb_pid: int | None = None
        self.lines: dict[tuple[str, str], int] = {}
        self.from_gnb: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def add(self, ev: Event) -> None:
        key = _event_key(ev)
        if key is None:
            return
        n = _event_count(ev)
        with self.lock:
            self.lines[key] = self.lines.get(key, 0) + n
            pid = self.gnb_pid
            if pid is not None and (ev.subject_tgid == pid or (ev.subject_tgid is None and ev.subject_pid == pid)):
                self.from_gnb[key] = self.from_gnb.get(key, 0) + n

    def total(self) -> int:
        """Events counted so far, all hooks."""
        with self.lock:
            return sum(self.lines.values())

    def tally(self, hooks: list[HookResult]) -> None:
        with self.lock:
            for h in hooks:
                kind, _, function = h.hook.partition("/")
                key = (function, _direction(kind))
                h.lines, h.from_gnb = self.lines.get(key, 0), self.from_gnb.get(key, 0)


def _wait_until_quiet(counts: _HookCounts, stop: threading.Event, quiet: float = 0.3, limit: float = 2.0) -> None:
    """Until no event arrived for ``quiet`` seconds (the flushed lines are read), at most ``limit``."""
    deadline = time.monotonic() + limit
    last = counts.total()
    while time.monotonic() < deadline and not stop.wait(quiet):
        now = counts.total()
        if now == last:
            return
        last = now


def _wait_for_hooks(hooks: list[HookResult], counts: _HookCounts, stop: threading.Event, timeout: float) -> None:
    """Until every expected hook has a line naming the gNB, or ``timeout`` (aggregated lines come late)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts.tally(hooks)
        if all(h.from_gnb for h in hooks if h.expected):
            return
        stop.wait(0.1)
