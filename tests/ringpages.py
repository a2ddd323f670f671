"""An encoder of tracefs ring-buffer pages for tests, written from the documented layout (the kernel's
Documentation/trace/ring-buffer-design.rst, events/header_page and events/header_event): the inverse of
what gtp5g_op.trace.rawbuf decodes, so tests can build any page the kernel could hand out, and some it
would not."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from gtp5g_op.trace.rawbuf import DATA_LOC, FIXED, MISSED_EVENTS, MISSED_STORED, REL_LOC, RawFormat

# This host's layout (x86-64, Linux 6.x): what read_format returns here.
FORMAT = RawFormat(page_size=4096, ts_offset=0, commit_offset=8, commit_size=8, data_offset=16, padding=29,
                   time_extend=30, time_stamp=31, max_data=28, event_id=550, type_offset=0, pid_offset=4,
                   msg_offset=8, msg_size=4, msg_kind=DATA_LOC)


@dataclass
class Page:
    """Events appended in order; ``bytes()`` lays them out after the header."""

    fmt: RawFormat = FORMAT
    timestamp: int = 0
    lost: int | None = None  # missed events before this page; None: none
    store_lost: bool = True  # write the count after the data (else only the flag)
    data: bytearray = field(default_factory=bytearray)

    def _head(self, type_len: int, delta: int) -> bytes:
        if self.fmt.big_endian:
            return struct.pack(">I", type_len << 27 | delta)
        return struct.pack("<I", delta << 5 | type_len)

    def _u32(self, value: int) -> bytes:
        return struct.pack(">I" if self.fmt.big_endian else "<I", value)

    def record(self, pid: int, msg: bytes, *, event_id: int | None = None, nul: bool = True) -> bytes:
        """A bpf_trace_printk record (common fields + the message where the format puts it)."""
        e = ">" if self.fmt.big_endian else "<"
        f = self.fmt
        text = msg + (b"\0" if nul else b"")
        fixed_end = max(f.type_offset + 2, f.pid_offset + 4, f.msg_offset + (f.msg_size if f.msg_kind == FIXED else 4))
        rec = bytearray(fixed_end)
        struct.pack_into(e + "H", rec, f.type_offset, f.event_id if event_id is None else event_id)
        struct.pack_into(e + "i", rec, f.pid_offset, pid)
        if f.msg_kind == FIXED:
            rec[f.msg_offset:f.msg_offset + f.msg_size] = text[:f.msg_size].ljust(f.msg_size, b"\0")
        else:
            start = len(rec) if f.msg_kind == DATA_LOC else len(rec) - (f.msg_offset + 4)
            struct.pack_into(e + "I", rec, f.msg_offset, len(text) << 16 | start)
            rec += text
        return bytes(rec)

    def event(self, record: bytes, delta: int = 0, *, large: bool = False) -> Page:
        """A data event: small (type_len words) when it fits and ``large`` is false, else length-prefixed."""
        body = record + b"\0" * (-len(record) % 4)
        if not large and 0 < len(body) <= 4 * self.fmt.max_data:
            self.data += self._head(len(body) // 4, delta) + body
        else:
            self.data += self._head(0, delta) + self._u32(len(body) + 4) + body
        return self

    def extend(self, delta: int) -> Page:
        """A time extend: adds ``delta`` ns (more than 27 bits) to the running time."""
        self.data += self._head(self.fmt.time_extend, delta & 0x7FFFFFF) + self._u32(delta >> 27)
        return self

    def stamp(self, ts: int) -> Page:
        """An absolute time stamp (its low 59 bits)."""
        self.data += self._head(self.fmt.time_stamp, ts & 0x7FFFFFF) + self._u32((ts >> 27) & 0xFFFFFFFF)
        return self

    def discarded(self, length: int, delta: int = 1) -> Page:
        """A discarded event of ``length`` bytes after its length word (which counts itself): skipped, its
        delta not counted."""
        self.data += self._head(self.fmt.padding, delta) + self._u32(length + 4) + b"\xee" * length
        return self

    def __bytes__(self) -> bytes:
        f = self.fmt
        e = ">" if f.big_endian else "<"
        word = "Q" if f.commit_size == 8 else "I"
        commit = len(self.data)
        extra = b""
        if self.lost is not None:
            commit |= MISSED_EVENTS
            if self.store_lost:
                commit |= MISSED_STORED
                extra = struct.pack(e + word, self.lost)
        head = bytearray(f.data_offset)
        struct.pack_into(e + "Q", head, f.ts_offset, self.timestamp)
        struct.pack_into(e + word, head, f.commit_offset, commit)
        page = bytes(head) + bytes(self.data) + extra
        if len(page) > f.page_size:
            raise ValueError(f"{len(page)} bytes do not fit a {f.page_size}-byte page")
        return page + b"\0" * (f.page_size - len(page))  # the null padding that ends a page


__all__ = ["FORMAT", "Page", "DATA_LOC", "REL_LOC", "FIXED"]
