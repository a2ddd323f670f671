"""Read a tracefs instance's per-CPU ring buffers (``per_cpu/cpuN/trace_pipe_raw``) instead of its text pipe.

Reading ``trace_pipe`` makes the kernel format every event as text inside read(2) (saved-cmdlines lookup,
printf): at 50 000 lines/s that alone costs about 7 % of a core. ``trace_pipe_raw`` hands out the ring
buffer's binary pages as they are, and :func:`decode` turns their ``bpf_trace_printk`` records into the
same text lines, so the same parser and pipeline take them. What differs from the kernel's text:

- the task column's comm is ``<...>`` (``<idle>`` for pid 0): a raw record carries the pid only. With
  validation on, the parser names such subjects from /proc (``TraceParser(resolve_comm=...)``), at read
  time rather than at event time; without validation the watch reads the text pipe instead (docs/live.md);
- no flags column (the kernel's flag bits differ between versions and nothing downstream reads them);
- records of other events (a ``trace_marker`` write, another event enabled in the instance) are counted
  in ``RawStats.other`` and not rendered.

Everything about the layout is read from tracefs at run time (``events/header_page``,
``events/header_event``, ``events/bpf_trace/bpf_trace_printk/format``, ``buffer_subbuf_size_kb``):
nothing is hard-coded but the page header's two "missed events" flag bits, which the kernel defines
without describing them in a file. A page (documented in the kernel's
Documentation/trace/ring-buffer-design.rst; libtraceevent's kbuffer reads the same layout):

- header: ``timestamp`` (u64, the time of the page's first event), ``commit`` (a long: bytes of event
  data, bit 31 set when events were lost before this page, bit 30 when their count follows the data as
  an unsigned long), then ``data``;
- each event starts with a 32-bit word: ``type_len`` (5 bits) and ``time_delta`` (27 bits, ns since the
  previous event). ``type_len`` 1..28: that many 4-byte words of record follow; 0: the next word is the
  length (itself included), then the record; 29: padding (``time_delta`` 0: the rest of the page;
  else the next word is its length); 30: time extend (the next word holds ``delta >> 27``); 31: an
  absolute time stamp, same encoding, its top 5 bits taken from the running time.

:func:`decode_py` is the reference, :mod:`gtp5g_op.trace._rawbuf` (C) the fast twin; property tests
(``tests/test_rawbuf.py``) require both to give identical results on generated and arbitrary pages.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gtp5g_op.errors import EnvironmentProblem

log = logging.getLogger(__name__)

HEADER_PAGE = "events/header_page"
HEADER_EVENT = "events/header_event"
PRINTK_FORMAT = "events/bpf_trace/bpf_trace_printk/format"
SUBBUF_SIZE = "buffer_subbuf_size_kb"  # Linux 6.8+; before, a sub-buffer is one page
MISSED_EVENTS = 1 << 31  # commit flags (kernel/trace/ring_buffer.c: RB_MISSED_EVENTS, RB_MISSED_STORED)
MISSED_STORED = 1 << 30
SIZE_MASK = MISSED_STORED - 1
TS_MSB = 0xF8 << 56  # an absolute time stamp event holds the low 59 bits only
MASK64 = (1 << 64) - 1
# record message kinds: where the bpf_trace_printk string is
DATA_LOC, REL_LOC, FIXED = 0, 1, 2
RESCAN = 1.0  # seconds between looks for CPUs that appeared or came back
_GONE = (errno.ENOENT, errno.ENODEV, errno.EBADF, errno.EIO, errno.ENXIO)
_FIELD_RE = re.compile(r"field:\s*(?P<type>[^;]*?)\s*(?P<name>\w+)(?:\[(?P<n>\d*)\])?;\s*offset:(?P<offset>\d+);"
                       r"\s*size:(?P<size>\d+);")


class RawUnavailable(Exception):
    """The ring buffers cannot be read as this module understands them (the reason is the message)."""


@dataclass(frozen=True, slots=True)
class RawFormat:
    """Where things are in a ring-buffer page and in a bpf_trace_printk record, as the kernel says."""

    page_size: int  # bytes one read of trace_pipe_raw returns (a sub-buffer)
    ts_offset: int
    commit_offset: int
    commit_size: int  # 8 on 64-bit kernels (local_t), 4 on 32-bit; also the size of the missed count
    data_offset: int
    padding: int  # type_len values
    time_extend: int
    time_stamp: int
    max_data: int
    event_id: int  # common_type of bpf_trace_printk
    type_offset: int
    pid_offset: int
    msg_offset: int
    msg_size: int
    msg_kind: int  # DATA_LOC, REL_LOC or FIXED
    big_endian: bool = sys.byteorder == "big"

    def params(self) -> tuple[int, ...]:
        """The format as the C decoder takes it (same order as the fields)."""
        return (self.page_size, self.ts_offset, self.commit_offset, self.commit_size, self.data_offset,
                self.padding, self.time_extend, self.time_stamp, self.max_data, self.event_id,
                self.type_offset, self.pid_offset, self.msg_offset, self.msg_size, self.msg_kind,
                int(self.big_endian))


@dataclass(slots=True)
class RawStats:
    """What decoding found besides lines: pages, records, losses whose count the page could not hold."""

    pages: int = 0
    events: int = 0  # bpf_trace_printk records rendered
    lost: int = 0  # events the pages said were lost (also rendered as LOST lines, which the parser counts)
    lost_unknown: int = 0  # pages flagged "events lost" without room for the count (see the overrun counters)
    other: int = 0  # records of other event types, not rendered
    bad: int = 0  # pages or records that did not parse (decoding of that page stopped there)

    def add(self, counts: tuple[int, ...]) -> None:
        self.pages += counts[0]
        self.events += counts[1]
        self.lost += counts[2]
        self.lost_unknown += counts[3]
        self.other += counts[4]
        self.bad += counts[5]

    def as_json(self) -> dict:
        return {"pages": self.pages, "events": self.events, "lost": self.lost,
                "lost_unknown": self.lost_unknown, "other_records": self.other, "bad": self.bad}


# --- the format, from tracefs ------------------------------------------------------------------
def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise RawUnavailable(f"cannot read {path}: {exc.strerror}") from None


def _fields(text: str) -> dict[str, re.Match]:
    return {m["name"]: m for m in _FIELD_RE.finditer(text)}


def parse_header_page(text: str) -> tuple[int, int, int, int]:
    """(timestamp offset, commit offset, commit size, data offset) from ``events/header_page``."""
    fields = _fields(text)
    try:
        ts, commit, data = fields["timestamp"], fields["commit"], fields["data"]
    except KeyError as exc:
        raise RawUnavailable(f"events/header_page has no {exc.args[0]} field") from None
    if int(ts["size"]) != 8 or int(commit["size"]) not in (4, 8):
        raise RawUnavailable("events/header_page describes a page header this reader does not know")
    return int(ts["offset"]), int(commit["offset"]), int(commit["size"]), int(data["offset"])


def parse_header_event(text: str) -> tuple[int, int, int, int]:
    """(padding, time extend, time stamp, max data) type_len values from ``events/header_event``."""
    def number(pattern: str, default: int | None = None) -> int:
        m = re.search(pattern, text)
        if m:
            return int(m[1])
        if default is None:
            raise RawUnavailable(f"events/header_event does not say {pattern!r}")
        return default

    if number(r"type_len\s*:\s*(\d+)\s*bits") != 5 or number(r"time_delta\s*:\s*(\d+)\s*bits") != 27:
        raise RawUnavailable("events/header_event describes an event header this reader does not know")
    # Linux < 4.14 does not print time_stamp (31, never written then)
    return (number(r"padding\s*:\s*type\s*==\s*(\d+)"), number(r"time_extend\s*:\s*type\s*==\s*(\d+)"),
            number(r"time_stamp\s*:\s*type\s*==\s*(\d+)", 31), number(r"data max type_len\s*==\s*(\d+)"))


def parse_event_format(text: str) -> tuple[int, int, int, int, int, int]:
    """(event id, common_type offset, common_pid offset, message offset, size, kind) from the
    bpf_trace_printk format file."""
    m = re.search(r"^ID:\s*(\d+)", text, re.M)
    if not m:
        raise RawUnavailable("the bpf_trace_printk format has no ID")
    fields = _fields(text)
    ctype, cpid = fields.get("common_type"), fields.get("common_pid")
    if ctype is None or cpid is None or int(ctype["size"]) != 2 or int(cpid["size"]) != 4:
        raise RawUnavailable("the bpf_trace_printk format has no 2-byte common_type and 4-byte common_pid")
    msg = next((f for name, f in fields.items() if not name.startswith("common_")), None)
    if msg is None:
        raise RawUnavailable("the bpf_trace_printk format has no message field")
    kind_text = msg["type"]
    if "__data_loc" in kind_text:
        kind = DATA_LOC
    elif "__rel_loc" in kind_text:
        kind = REL_LOC
    elif kind_text.endswith("char") and msg["n"]:
        kind = FIXED
    else:
        raise RawUnavailable(f"the bpf_trace_printk message field is {kind_text!r}, which this reader does not know")
    if kind != FIXED and int(msg["size"]) != 4:
        raise RawUnavailable("the bpf_trace_printk message field is not a 4-byte location")
    return (int(m[1]), int(ctype["offset"]), int(cpid["offset"]), int(msg["offset"]), int(msg["size"]), kind)


def read_format(instance: Path) -> RawFormat:
    """The ring-buffer layout of the tracefs instance at ``instance``; RawUnavailable says why not."""
    if not (instance / "per_cpu").is_dir():
        raise RawUnavailable(f"{instance} has no per_cpu directory")
    page = parse_header_page(_read(instance / HEADER_PAGE))
    event = parse_header_event(_read(instance / HEADER_EVENT))
    fmt = parse_event_format(_read(instance / PRINTK_FORMAT))
    page_size = os.sysconf("SC_PAGESIZE")
    subbuf = instance / SUBBUF_SIZE
    if subbuf.exists():
        text = _read(subbuf).strip()
        if not text.isdigit() or int(text) <= 0:
            raise RawUnavailable(f"{subbuf} says {text!r}")
        page_size = int(text) * 1024
    if page_size <= page[3]:
        raise RawUnavailable(f"sub-buffers of {page_size} bytes cannot hold the page header")
    return RawFormat(page_size, *page, *event, *fmt)


# --- decoding ----------------------------------------------------------------------------------
def fix_abs_ts(abs_ts: int, running: int) -> int:
    """An absolute time stamp event's 59 bits, completed with the top bits of the running time."""
    if running & TS_MSB:
        abs_ts |= running & TS_MSB
        if abs_ts < running:
            abs_ts = (abs_ts + (1 << 59)) & MASK64
    return abs_ts


def render_line(cpu: int, pid: int, ts_ns: int, msg: bytes) -> bytes:
    """A trace_pipe line for one bpf_trace_printk record (the kernel rounds ns to µs the same way)."""
    us = ((ts_ns + 500) & MASK64) // 1000
    task = b"<idle>" if pid == 0 else b"<...>"
    return b"%s-%d [%03d] %d.%06d: bpf_trace_printk: %s\n" % (task, pid, cpu, us // 1000000, us % 1000000, msg)


def lost_line(cpu: int, count: int) -> bytes:
    """What the text pipe prints where events were lost."""
    return b"CPU:%d [LOST %d EVENTS]\n" % (cpu, count)


def decode_py(pages: bytes, params: tuple[int, ...], cpu: int) -> tuple[bytes, tuple[int, ...]]:
    """Decode ``pages`` (whole sub-buffers of ``page_size`` bytes; a short last one is decoded as far as it
    goes) read from CPU ``cpu``: the text lines, and counts (pages, events, lost, lost_unknown, other, bad).
    The reference for the C decoder, which must give the same for any bytes."""
    if cpu < 0:
        raise ValueError("bad ring-buffer format")
    fmt = RawFormat(*params[:-1], big_endian=bool(params[-1]))
    out: list[bytes] = []
    counts = [0, 0, 0, 0, 0, 0]
    view = memoryview(pages)
    for start in range(0, len(pages), fmt.page_size):
        counts[0] += 1
        _decode_page(view[start:start + fmt.page_size], fmt, cpu, out, counts)
    return b"".join(out), tuple(counts)


def _decode_page(page: memoryview, fmt: RawFormat, cpu: int, out: list[bytes], counts: list[int]) -> None:
    e = ">" if fmt.big_endian else "<"
    u32, u64 = struct.Struct(e + "I").unpack_from, struct.Struct(e + "Q").unpack_from
    word = struct.Struct(e + ("Q" if fmt.commit_size == 8 else "I")).unpack_from
    if len(page) < fmt.data_offset:
        counts[5] += 1
        return
    ts = u64(page, fmt.ts_offset)[0]
    commit = word(page, fmt.commit_offset)[0]
    size = commit & SIZE_MASK
    room = len(page) - fmt.data_offset
    if size > room:
        counts[5] += 1
        return
    data = page[fmt.data_offset:fmt.data_offset + size]
    if commit & MISSED_EVENTS:
        if commit & MISSED_STORED and size + fmt.commit_size <= room:
            lost = word(page, fmt.data_offset + size)[0]
            counts[2] += lost
            out.append(lost_line(cpu, lost))
        else:
            counts[3] += 1
    pos = 0
    while pos + 4 <= size:
        head = u32(data, pos)[0]
        if fmt.big_endian:
            type_len, delta = head >> 27, head & 0x7FFFFFF
        else:
            type_len, delta = head & 31, head >> 5
        if type_len == fmt.padding and delta == 0:
            return  # the rest of the page is padding
        if type_len in (fmt.padding, fmt.time_extend, fmt.time_stamp) or type_len == 0:
            if pos + 8 > size:
                counts[5] += 1
                return
            array0 = u32(data, pos + 4)[0]
        if type_len == fmt.padding:  # a discarded event: array[0] is its length
            pos += 4 + array0
            if pos > size:
                counts[5] += 1
            continue
        if type_len == fmt.time_extend:
            ts = (ts + (delta | array0 << 27)) & MASK64
            pos += 8
            continue
        if type_len == fmt.time_stamp:
            ts = fix_abs_ts(delta | array0 << 27, ts)
            pos += 8
            continue
        if type_len == 0:
            if array0 < 4 or pos + 4 + array0 > size:
                counts[5] += 1
                return
            record, pos = data[pos + 8:pos + 4 + array0], pos + 4 + array0
        elif type_len <= fmt.max_data:
            if pos + 4 + 4 * type_len > size:
                counts[5] += 1
                return
            record, pos = data[pos + 4:pos + 4 + 4 * type_len], pos + 4 + 4 * type_len
        else:
            counts[5] += 1
            return
        ts = (ts + delta) & MASK64
        _record(record, fmt, cpu, ts, out, counts, e)


def _record(rec: memoryview, fmt: RawFormat, cpu: int, ts: int, out: list[bytes], counts: list[int],
            e: str) -> None:
    need = max(fmt.type_offset + 2, fmt.pid_offset + 4, fmt.msg_offset + (4 if fmt.msg_kind != FIXED else 0))
    if len(rec) < need:
        counts[5] += 1
        return
    if struct.unpack_from(e + "H", rec, fmt.type_offset)[0] != fmt.event_id:
        counts[4] += 1
        return
    pid = struct.unpack_from(e + "i", rec, fmt.pid_offset)[0]
    if fmt.msg_kind == FIXED:
        off, length = fmt.msg_offset, fmt.msg_size
    else:
        loc = struct.unpack_from(e + "I", rec, fmt.msg_offset)[0]
        off, length = loc & 0xFFFF, loc >> 16
        if fmt.msg_kind == REL_LOC:
            off += fmt.msg_offset + 4
    msg = bytes(rec[off:off + length]) if off < len(rec) else b""
    nul = msg.find(b"\0")
    if nul >= 0:
        msg = msg[:nul]
    counts[1] += 1
    out.append(render_line(cpu, pid, ts, msg))


Decoder = Callable[[bytes, tuple[int, ...], int], tuple[bytes, tuple[int, ...]]]


def best_decoder(accelerate: bool = True) -> tuple[Decoder, bool]:
    """(decode function, True when it is the C one)."""
    if accelerate:
        try:
            from gtp5g_op.trace import _rawbuf  # type: ignore[attr-defined]
        except ImportError:
            log.debug("C ring-buffer decoder not built; using the pure-Python one")
        else:
            return _rawbuf.decode, True
    return decode_py, False


# --- reading -----------------------------------------------------------------------------------
class RawReader:
    """Reads every CPU's ``trace_pipe_raw`` of an instance in one thread; iterating yields text lines.

    One poll(2) sleeps on all CPUs (at most ``poll_seconds``, so a stop is honoured). Once data
    arrives it sleeps ``batch_seconds`` more, then drains every CPU (whole sub-buffers, non-blocking, up
    to ``batch_bytes`` of pages) and decodes them into one chunk: a few wake-ups a second whatever the
    rate, the first line waiting at most about ``batch_seconds``. After a poll timeout it drains too, so
    a kernel whose poll waits for a fuller buffer (``buffer_percent``) still hands lines on within
    ``poll_seconds``. CPUs that come and go are handled: a CPU whose poll reports an error (its buffer is
    offline) is read but not polled until the next rescan (every RESCAN seconds, which also opens CPUs
    that appeared); one whose file went away is closed and reopened when it is back.

    ``close()`` (called by the thread that iterates, e.g. through ``contextlib.closing``) closes every
    descriptor; the instance can be removed after it.
    """

    def __init__(self, instance: Path, stop: threading.Event, fmt: RawFormat | None = None, *,
                 decode: Decoder | None = None, batch_seconds: float = 0.1, batch_bytes: int = 1 << 20,
                 poll_seconds: float = 0.2):
        self.instance = Path(instance)
        self.fmt = fmt or read_format(self.instance)
        self.decode = decode or best_decoder()[0]
        self.stop = stop
        self.batch_seconds = batch_seconds
        self.batch_bytes = max(batch_bytes, self.fmt.page_size)
        self.poll_seconds = poll_seconds
        self.stats = RawStats()
        self._params = self.fmt.params()
        self._fds: dict[int, int] = {}  # cpu -> fd
        self._polled: set[int] = set()  # cpus whose fd is registered with the poller
        self._poller = select.poll()
        self._by_fd: dict[int, int] = {}
        self._last_scan = 0.0
        self._closed = False
        self._scan()
        if not self._fds:
            self.close()
            raise EnvironmentProblem(f"no per-CPU ring buffer of {self.instance} can be opened",
                                     "use --read-mode text")

    # CPUs
    def _scan(self) -> None:
        """Open CPUs not open yet; poll again CPUs parked after a poll error."""
        self._last_scan = time.monotonic()
        try:
            names = os.listdir(self.instance / "per_cpu")
        except FileNotFoundError:
            raise EnvironmentProblem(f"tracefs instance {self.instance} went away",
                                     "restart once the tracefs instance is back") from None
        for name in names:
            if not (name.startswith("cpu") and name[3:].isdigit()):
                continue
            cpu = int(name[3:])
            if cpu not in self._fds:
                try:
                    fd = os.open(self.instance / "per_cpu" / name / "trace_pipe_raw",
                                 os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError as exc:
                    log.debug("cpu%d: cannot open trace_pipe_raw: %s", cpu, exc.strerror)
                    continue
                self._fds[cpu] = fd
                self._by_fd[fd] = cpu
            if cpu not in self._polled:
                self._poller.register(self._fds[cpu], select.POLLIN)
                self._polled.add(cpu)

    def _park(self, cpu: int) -> None:
        if cpu in self._polled:
            self._poller.unregister(self._fds[cpu])
            self._polled.discard(cpu)

    def _drop(self, cpu: int, why: str) -> None:
        log.info("cpu%d: trace_pipe_raw went away (%s); reopened when it is back", cpu, why)
        self._park(cpu)
        fd = self._fds.pop(cpu)
        self._by_fd.pop(fd, None)
        os.close(fd)

    def _wait(self) -> bool:
        """Sleep until a CPU has data or ``poll_seconds`` passed; True when woken by data."""
        if time.monotonic() - self._last_scan >= RESCAN:
            self._scan()
        if not self._polled:
            self.stop.wait(self.poll_seconds)
            return False
        woke = False
        for fd, ev in self._poller.poll(int(self.poll_seconds * 1000)):
            if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                self._park(self._by_fd[fd])  # an offline CPU's buffer: read at drains, polled after a rescan
            elif ev & select.POLLIN:
                woke = True
        return woke

    # data
    def _drain(self) -> tuple[bytes, bool]:
        """Read what every CPU has (up to batch_bytes in all); (text, True if the limit cut it short)."""
        size, left, chunks = self.fmt.page_size, self.batch_bytes, []
        full = False
        for cpu in sorted(self._fds):
            pages = []
            while left > 0:
                try:
                    page = os.read(self._fds[cpu], size)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno not in _GONE:
                        raise
                    self._drop(cpu, exc.strerror)
                    break
                if not page:
                    break
                pages.append(page)
                left -= len(page)
            else:
                full = True
            if pages:
                text, counts = self.decode(b"".join(pages), self._params, cpu)
                self.stats.add(counts)
                if text:
                    chunks.append(text)
        if not self._fds:
            raise EnvironmentProblem(f"the ring buffers of tracefs instance {self.instance} went away",
                                     "restart once the tracefs instance is back")
        return b"".join(chunks), full

    def __iter__(self) -> Iterator[bytes]:
        more = False
        while not self.stop.is_set():
            if not more and self._wait() and self.batch_seconds > 0 and self.stop.wait(self.batch_seconds):
                break
            text, more = self._drain()
            if text:
                yield text

    def close(self) -> None:
        """Close every CPU's descriptor; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._by_fd.clear()
        self._polled.clear()
