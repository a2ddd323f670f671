"""trace_pipe bytes → events and per-subject summaries.

The rules (docs/trace-format.md, from the project's trace-format reference):

* line: ``<comm>-<pid> [(<tgid>)] [<cpu>] <flags> <ts>: <event>: <message>``; the pid is the digits
  after the dash where the first valid split of the task column starts (the comm is at most 64 bytes and
  may contain dashes, spaces, brackets, parentheses and ``pid=``).
* ``CPU:<n> [LOST <m> EVENTS]`` lines add ``m`` to the lost-event count; blank lines and ``#`` comment
  lines (the header of a ``trace`` file) are ignored; any other line is malformed (counted, never fatal).
* subject: (1) the first ``pid=N (`` in the message, named up to the LAST ``)`` of the line; else
  (2) ``PID=N, TGID=M`` in the message, comm from the task column; else (3) the task column.
  Pid 0 and pids above PID_MAX_LIMIT are never subjects.
* count: a line stands for one event, or for ``N`` events when the message starts ``<hook>: N=<n>,``
  (the bundled tracer aggregates in the kernel and prints one line per thread and hook per interval).

:class:`TraceParser` feeds arbitrary byte chunks (partial lines are kept until their newline) and
returns per-subject summaries for subjects whose comm fully matches the target regex. A subject whose
comm the kernel did not know (``<...>``) is named by ``resolve_comm(pid)`` when one is given (live
watching: the comm in /proc), then matched. It uses the C
accelerator ``gtp5g_op.trace._fastscan`` when it was built, and :func:`parse_line` otherwise; both follow the
same rules and are tested against each other.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEFAULT_MATCH = r"^(nr-gnb|nr-ue)$"
PID_MAX_LIMIT = 4194304  # the kernel's ceiling for pid_max on 64-bit
MAX_COMM = 64  # longest task-column comm accepted (the kernel prints at most 15 bytes)
MAX_LINE = 1 << 18  # longer lines cannot be bpf_printk output: dropped and counted as malformed
_COMM_CACHE_MAX = 1 << 16
UNKNOWN_COMM = "<...>"  # task column of a thread whose comm the kernel had not cached
NAME_TTL = 1.0  # seconds a name from resolve_comm is reused (the live checks still compare with /proc)

_NOT_WORD = rb"(?<![A-Za-z0-9_])"
_SPLIT = (
    rb"-(?P<pid>\d+)"
    rb"(?: +\((?P<tgid> *\d+|-+)\))?"
    rb" +\[(?P<cpu>\d+)\]"
    rb" +(?:(?P<flags>[^\s\[\]:]+) +)?"
    rb"(?P<ts>\d+(?:\.\d+)?):"
)
_EVENT_RE = re.compile(
    rb" *(?P<comm>[^\n]{0,%d}?)" % MAX_COMM
    + _SPLIT
    + rb"(?: (?P<event>[^\s:]+):(?: (?:0x[0-9a-fA-F]+: )?(?P<msg>[^\n]*))?)?",
    re.S,
)
_LOST_RE = re.compile(rb"CPU:(\d+) \[LOST (\d{1,18}) EVENTS\]")
_RULE1_RE = re.compile(_NOT_WORD + rb"pid=(\d+) \(")
_RULE2_RE = re.compile(_NOT_WORD + rb"PID=(\d+), TGID=(\d+)")
_HOOK_RE = re.compile(rb"([A-Za-z_][\w./-]*): ")
# An aggregated line's event count: right after the hook, before any other field (so nothing a
# process names itself, e.g. a comm in a rule-1 message, can stand in that place).
_COUNT_RE = re.compile(rb"N=([1-9][0-9]{0,9})(?:,|\Z)")


def _pid(digits: bytes) -> int | None:
    """A pid from its digits, or None when it cannot be a pid."""
    if len(digits) > 7:
        return None
    value = int(digits)
    return value if value <= PID_MAX_LIMIT else None


def _text(raw: bytes) -> str:
    """Decode trace bytes losslessly (invalid UTF-8 survives as surrogates; see :func:`printable`)."""
    return raw.decode("utf-8", "surrogateescape")


def printable(text: str) -> str:
    """``text`` with undecodable bytes shown as ``\\xNN``, for terminals."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class Event:
    """One trace line and who it is about."""

    comm: str  # task column
    pid: int
    tgid: int | None  # record-tgid column, None when absent or unknown
    cpu: int
    flags: str
    timestamp: float
    event: str  # bpf_trace_printk, or what an older kernel printed there
    message: str
    hook: str | None  # message prefix before ': ' (fentry/gtp5g_encap_recv, stop, ...)
    subject_pid: int | None
    subject_tgid: int | None
    subject_comm: str
    rule: int  # 1: pid=N (name), 2: PID=N, TGID=M, 3: task column
    count: int = 1  # events the line stands for: its ``N=`` (aggregating tracer), else 1


def parse_line(line: bytes) -> Event | None:
    """Parse one line (without its newline; one trailing CR is dropped); None if it is no event line."""
    return _parse(line[:-1] if line.endswith(b"\r") else line)


def _parse(line: bytes) -> Event | None:
    m = _EVENT_RE.fullmatch(line)
    if m is None:
        return None
    pid = _pid(m["pid"])
    if pid is None:
        return None
    raw_tgid = m["tgid"]
    tgid = _pid(raw_tgid.strip()) if raw_tgid and raw_tgid[-1:] != b"-" else None
    comm = _text(m["comm"])
    msg = m["msg"] or b""
    hook_m = _HOOK_RE.match(msg)
    count_m = _COUNT_RE.match(msg, hook_m.end()) if hook_m else None
    s_pid: int | None
    r1 = _RULE1_RE.search(msg)
    close = msg.rfind(b")") if r1 else -1
    if r1 and close >= r1.end():
        rule, s_pid, s_tgid, s_comm = 1, _pid(r1[1]), None, _text(msg[r1.end():close])
    else:
        r2 = _RULE2_RE.search(msg)
        if r2:
            rule, s_pid, s_comm = 2, _pid(r2[1]), comm
            s_tgid = _pid(r2[2])
        else:
            rule, s_pid, s_tgid, s_comm = 3, pid, tgid, comm
    if s_pid == 0:
        s_pid = None
    return Event(
        comm=comm,
        pid=pid,
        tgid=tgid,
        cpu=int(m["cpu"]),
        flags=_text(m["flags"] or b""),
        timestamp=float(m["ts"]),
        event=_text(m["event"] or b""),
        message=_text(msg),
        hook=_text(hook_m[1]) if hook_m else None,
        subject_pid=s_pid,
        subject_tgid=s_tgid or None,
        subject_comm=s_comm,
        rule=rule,
        count=int(count_m[1]) if count_m else 1,
    )


def render(event: Event) -> bytes:
    """The trace_pipe line for ``event`` (inverse of :func:`parse_line` for the fields it prints)."""
    task = f"{event.comm}-{event.pid:<7d}"
    tgid = f" ({event.tgid:7d})" if event.tgid is not None else ""
    flags = f" {event.flags}" if event.flags else ""
    return (
        f"{task:>24s}{tgid} [{event.cpu:03d}]{flags} {event.timestamp:12.6f}: "
        f"{event.event}: {event.message}"
    ).encode("utf-8", "surrogateescape")


@dataclass(slots=True)
class Stats:
    """Counters over everything fed so far."""

    lines: int = 0
    events: int = 0  # kernel events: one per event line, or its N= when the tracer aggregated
    matched: int = 0  # events whose subject is a target
    malformed: int = 0
    lost_events: int = 0

    def as_json(self) -> dict:
        return {
            "lines": self.lines,
            "events": self.events,
            "matched": self.matched,
            "malformed": self.malformed,
            "lost_events": self.lost_events,
        }


@dataclass(slots=True)
class SubjectUpdate:
    """What one fed chunk said about one target subject."""

    pid: int
    tgid: int | None
    comm: str
    count: int
    first_ts: float  # smallest timestamp
    last_ts: float  # largest timestamp
    hooks: set[str] = field(default_factory=set)


def _merge(into: dict[tuple[int, str], SubjectUpdate], later: list[SubjectUpdate]) -> None:
    """Fold updates from a later part of the stream into ``into``."""
    for upd in later:
        key = (upd.pid, upd.comm)
        have = into.get(key)
        if have is None:
            into[key] = upd
            continue
        have.count += upd.count
        have.first_ts = min(have.first_ts, upd.first_ts)
        have.last_ts = max(have.last_ts, upd.last_ts)
        have.hooks |= upd.hooks
        if upd.tgid is not None:
            have.tgid = upd.tgid


def _load_accelerator():
    try:
        from gtp5g_op.trace import _fastscan  # type: ignore[attr-defined]
    except ImportError:
        log.debug("C accelerator not built; using the pure-Python parser")
        return None
    return _fastscan


class TraceParser:
    """Incremental parser: ``feed(bytes)`` → target subjects seen in the complete lines so far."""

    def __init__(self, match: str = DEFAULT_MATCH, accelerate: bool = True,
                 resolve_comm: Callable[[int], str | None] | None = None):
        try:
            self.target = re.compile(match)
        except re.error as exc:
            from gtp5g_op.errors import UsageError

            raise UsageError(f"--match {match!r} is not a valid regex: {exc}", "fix the pattern") from exc
        self.stats = Stats()
        self._tail = b""
        self._skipping = False  # inside an over-long line, dropping bytes until its newline
        self._comm_cache: dict[bytes, bool] = {}
        self._resolve = resolve_comm
        self._names: dict[int, tuple[float, str | None]] = {}  # pid -> (when asked, comm or None)
        self._accel = _load_accelerator() if accelerate else None

    @property
    def accelerated(self) -> bool:
        """True when the C accelerator does the scanning."""
        return self._accel is not None

    def matches(self, comm: str) -> bool:
        """Whether a comm is a target (full match of the target regex)."""
        return self.target.fullmatch(comm) is not None

    def _candidate(self, comm: str) -> bool:
        """A target, or an unknown comm that :meth:`_name_unknown` will look up."""
        return self.matches(comm) or (self._resolve is not None and comm == UNKNOWN_COMM)

    def _matches_raw(self, comm: bytes) -> bool:
        cache = self._comm_cache
        hit = cache.get(comm)
        if hit is None:
            if len(cache) >= _COMM_CACHE_MAX:
                cache.clear()
            hit = cache[comm] = self._candidate(_text(comm))
        return hit

    def _name_unknown(self, updates: list[SubjectUpdate]) -> list[SubjectUpdate]:
        """Give ``<...>`` subjects their comm from ``resolve_comm``; drop those that are no target."""
        if self._resolve is None or not any(u.comm == UNKNOWN_COMM for u in updates):
            return updates
        named: dict[tuple[int, str], SubjectUpdate] = {}
        now = time.monotonic()
        # Named subjects first, and their tgid stands: the C scan does not keep the order of subjects, so
        # "the last line's tgid" cannot decide between a named and a renamed part of one subject.
        for upd in sorted(updates, key=lambda u: u.comm == UNKNOWN_COMM):
            if upd.comm == UNKNOWN_COMM:
                upd.comm = self._name_of(upd.pid, now) or UNKNOWN_COMM
                if not self.matches(upd.comm):
                    self.stats.matched -= upd.count
                    continue
                have = named.get((upd.pid, upd.comm))
                if have is not None and have.tgid is not None:
                    upd.tgid = None
            _merge(named, [upd])
        return list(named.values())

    def _name_of(self, pid: int, now: float) -> str | None:
        """``resolve_comm(pid)``, asked at most once per NAME_TTL per pid. A pid that is gone by now keeps
        the name it last had: its last lines, read after it exited, still count for it."""
        asked = self._names.get(pid)
        if asked is None or now - asked[0] > NAME_TTL:
            if len(self._names) >= _COMM_CACHE_MAX:
                self._names.clear()
            name = self._resolve(pid)  # type: ignore[misc]
            if name is None and asked is not None:
                name = asked[1]
            asked = self._names[pid] = (now, name)
        return asked[1]

    def feed(self, data: bytes) -> list[SubjectUpdate]:
        """Parse the complete lines in ``tail + data``; keep the rest for the next call."""
        if not data:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            self._hold(data)
            return []
        head = data[: end + 1]
        if self._skipping:
            cut = head.find(b"\n") + 1
            head, self._skipping = head[cut:], False
        elif self._tail:
            head = self._tail + head
        self._tail = b""
        updates = self._scan(head)
        self._hold(data[end + 1 :])
        return self._name_unknown(updates)

    def finish(self) -> list[SubjectUpdate]:
        """Parse a last line that never got its newline."""
        tail, self._tail = self._tail, b""
        skipping, self._skipping = self._skipping, False
        if skipping or not tail:
            return []
        return self._name_unknown(self._scan(tail + b"\n"))

    def _hold(self, rest: bytes) -> None:
        """Keep a partial line; an over-long one is dropped and counted as malformed."""
        if self._skipping:
            return
        if len(self._tail) + len(rest) > MAX_LINE:
            self._tail = b""
            self._skipping = True
            self.stats.lines += 1
            self.stats.malformed += 1
        elif rest:
            self._tail += rest

    def _scan(self, buf: bytes) -> list[SubjectUpdate]:
        """Parse ``buf``, which holds whole lines ending in ``\\n``."""
        if self._accel is None:
            return self._scan_python(buf)
        merged: dict[tuple[int, str], SubjectUpdate] = {}
        view, pos, st = memoryview(buf), 0, self.stats
        while pos < len(buf):
            counts, subjects, used = self._accel.scan(view[pos:], self._comm_cache, self._matches_raw, MAX_LINE)
            st.lines += counts[0]
            st.events += counts[1]
            st.matched += counts[2]
            st.malformed += counts[3]
            st.lost_events += counts[4]
            found = [
                SubjectUpdate(pid, tgid, _text(comm), n, first, last, {_text(h) for h in hooks})
                for (pid, comm), (tgid, n, first, last, hooks) in subjects.items()
            ]
            pos += used
            if used == 0:  # a line the C tables cannot hold (e.g. a 100-byte hook name)
                nl = buf.index(b"\n", pos) + 1
                found = self._scan_python(buf[pos:nl])
                pos = nl
            _merge(merged, found)
        return list(merged.values())

    def _scan_python(self, buf: bytes) -> list[SubjectUpdate]:
        st = self.stats
        subjects: dict[tuple[int, str], SubjectUpdate] = {}
        lines = buf.split(b"\n")
        lines.pop()  # the empty string after the final newline
        st.lines += len(lines)
        for line in lines:
            if len(line) > MAX_LINE:
                st.malformed += 1
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            ev = _parse(line)
            if ev is None:
                lost = _LOST_RE.fullmatch(line)
                if lost:
                    st.lost_events += int(lost[2])
                elif line.strip(b" \r") and not line.lstrip(b" ").startswith(b"#"):
                    st.malformed += 1
                continue
            st.events += ev.count
            if ev.subject_pid is None or not self._candidate(ev.subject_comm):
                continue
            st.matched += ev.count
            key = (ev.subject_pid, ev.subject_comm)
            upd = subjects.get(key)
            if upd is None:
                upd = subjects[key] = SubjectUpdate(
                    ev.subject_pid, ev.subject_tgid, ev.subject_comm, 0, ev.timestamp, ev.timestamp
                )
            upd.count += ev.count
            upd.first_ts = min(upd.first_ts, ev.timestamp)
            upd.last_ts = max(upd.last_ts, ev.timestamp)
            if ev.subject_tgid is not None:
                upd.tgid = ev.subject_tgid
            if ev.hook is not None:
                upd.hooks.add(ev.hook)
        return list(subjects.values())
