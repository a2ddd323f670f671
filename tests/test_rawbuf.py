"""The ring-buffer reader: format files, the page decoder (Python reference == C twin), and reading a real
instance's per_cpu/cpuN/trace_pipe_raw (root)."""

from __future__ import annotations

import dataclasses
import os
import struct
import threading
import time
from pathlib import Path

import pytest
from conftest import require_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ringpages import DATA_LOC, FIXED, FORMAT, REL_LOC, Page

from gtp5g_op.errors import EnvironmentProblem
from gtp5g_op.trace import rawbuf
from gtp5g_op.trace.parser import TraceParser, parse_line
from gtp5g_op.trace.rawbuf import RawFormat, RawReader, RawUnavailable, decode_py

try:
    from gtp5g_op.trace import _rawbuf
except ImportError:  # pragma: no cover - the C twin is optional
    _rawbuf = None

needs_c = pytest.mark.skipif(_rawbuf is None, reason="the C decoder _rawbuf is not built (no compiler?)")
DECODERS = [decode_py] + ([_rawbuf.decode] if _rawbuf else [])

HEADER_PAGE = """\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;
\tfield: local_t commit;\toffset:8;\tsize:8;\tsigned:1;
\tfield: int overwrite;\toffset:8;\tsize:1;\tsigned:1;
\tfield: char data;\toffset:16;\tsize:4080;\tsigned:0;
"""
HEADER_EVENT = """# compressed entry header
\ttype_len    :    5 bits
\ttime_delta  :   27 bits
\tarray       :   32 bits

\tpadding     : type == 29
\ttime_extend : type == 30
\ttime_stamp : type == 31
\tdata max type_len  == 28
"""
PRINTK_FORMAT = """name: bpf_trace_printk
ID: 550
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] bpf_string;\toffset:8;\tsize:4;\tsigned:0;

print fmt: "%s", __get_str(bpf_string)
"""


def decode(page: bytes | Page, fmt: RawFormat = FORMAT, cpu: int = 1, decoder=decode_py):
    data = bytes(page) if isinstance(page, Page) else page
    text, counts = decoder(data, fmt.params(), cpu)
    names = ("pages", "events", "lost", "lost_unknown", "other", "bad")
    return text.decode("utf-8", "surrogateescape").splitlines(), dict(zip(names, counts))


# --- the format files --------------------------------------------------------------------------------

def fake_instance(tmp_path: Path, page: str = HEADER_PAGE, event: str = HEADER_EVENT, fmt: str = PRINTK_FORMAT,
                  subbuf: str | None = None) -> Path:
    (tmp_path / "per_cpu/cpu0").mkdir(parents=True)
    (tmp_path / "events/bpf_trace/bpf_trace_printk").mkdir(parents=True)
    (tmp_path / "events/header_page").write_text(page)
    (tmp_path / "events/header_event").write_text(event)
    (tmp_path / rawbuf.PRINTK_FORMAT).write_text(fmt)
    if subbuf is not None:
        (tmp_path / "buffer_subbuf_size_kb").write_text(subbuf)
    return tmp_path


def test_format_files_of_this_kernel_are_read(tmp_path):
    assert rawbuf.read_format(fake_instance(tmp_path, subbuf="4\n")) == FORMAT


def test_the_real_tracefs_format_is_understood():
    require_root("tracefs needs root")
    from gtp5g_op.trace.tracefs import find_tracefs

    fmt = rawbuf.read_format(find_tracefs())
    assert fmt.page_size >= os.sysconf("SC_PAGESIZE") and fmt.data_offset in (12, 16)
    assert fmt.msg_kind in (DATA_LOC, REL_LOC, FIXED) and fmt.event_id > 0


def test_other_layouts_are_read_from_the_files(tmp_path):
    """A 32-bit kernel's 4-byte commit, a __rel_loc or fixed-array message, a bigger sub-buffer."""
    page32 = HEADER_PAGE.replace("offset:8;\tsize:8", "offset:8;\tsize:4").replace("offset:16", "offset:12")
    rel = PRINTK_FORMAT.replace("__data_loc char[] bpf_string", "__rel_loc char[] bpf_string")
    fixed = PRINTK_FORMAT.replace("__data_loc char[] bpf_string;\toffset:8;\tsize:4",
                                  "char buf[32];\toffset:8;\tsize:32")
    fmt = rawbuf.read_format(fake_instance(tmp_path / "a", page=page32, fmt=rel, subbuf="8"))
    assert (fmt.commit_size, fmt.data_offset, fmt.msg_kind, fmt.page_size) == (4, 12, REL_LOC, 8192)
    fmt = rawbuf.read_format(fake_instance(tmp_path / "b", fmt=fixed))
    assert (fmt.msg_kind, fmt.msg_offset, fmt.msg_size) == (FIXED, 8, 32)
    assert fmt.page_size == os.sysconf("SC_PAGESIZE")  # no buffer_subbuf_size_kb: one page


@pytest.mark.parametrize("where, old, new, why", [
    ("page", "field: local_t commit", "field: local_t kommit", "no commit field"),
    ("event", "5 bits", "6 bits", "event header this reader does not know"),
    ("event", "\tpadding     : type == 29\n", "", "padding"),
    ("fmt", "ID: 550", "", "no ID"),
    ("fmt", "__data_loc char[] bpf_string", "u64 bpf_string", "which this reader does not know"),
    ("fmt", "int common_pid;\toffset:4;\tsize:4", "int common_pid;\toffset:4;\tsize:2", "common_pid"),
])
def test_an_unknown_layout_says_why(tmp_path, where, old, new, why):
    texts = {"page": HEADER_PAGE, "event": HEADER_EVENT, "fmt": PRINTK_FORMAT}
    assert old in texts[where]
    texts[where] = texts[where].replace(old, new)
    with pytest.raises(RawUnavailable, match=why):
        rawbuf.read_format(fake_instance(tmp_path, texts["page"], texts["event"], texts["fmt"]))


def test_no_per_cpu_directory_is_unavailable(tmp_path):
    with pytest.raises(RawUnavailable, match="no per_cpu"):
        rawbuf.read_format(tmp_path)


# --- decoding known pages ----------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", DECODERS)
def test_events_become_trace_pipe_lines_the_parser_reads(decoder):
    p = Page(timestamp=10_602_024_239_400)
    p.event(p.record(4242, b"selftest/sys_enter_getppid: PID=4242, TGID=4240, CPU=1"), delta=0)
    p.event(p.record(4242, b"fentry/gtp5g_encap_recv: N=7, PID=4242, TGID=4240"), delta=3_100)
    p.event(p.record(0, b"in softirq"), delta=1)
    lines, counts = decode(p, cpu=3, decoder=decoder)
    assert lines == [
        "<...>-4242 [003] 10602.024239: bpf_trace_printk: selftest/sys_enter_getppid: PID=4242, TGID=4240, CPU=1",
        "<...>-4242 [003] 10602.024243: bpf_trace_printk: fentry/gtp5g_encap_recv: N=7, PID=4242, TGID=4240",
        "<idle>-0 [003] 10602.024243: bpf_trace_printk: in softirq",
    ]
    assert counts == {"pages": 1, "events": 3, "lost": 0, "lost_unknown": 0, "other": 0, "bad": 0}
    ev = parse_line(lines[1].encode())
    assert (ev.pid, ev.comm, ev.cpu, ev.timestamp, ev.hook, ev.count, ev.subject_pid, ev.subject_tgid) == (
        4242, "<...>", 3, 10602.024243, "fentry/gtp5g_encap_recv", 7, 4242, 4240)


@pytest.mark.parametrize("decoder", DECODERS)
def test_time_extend_stamp_discarded_and_large_events(decoder):
    p = Page(timestamp=5_000_000_000)
    p.event(p.record(7, b"a"), delta=1000)              # 5.000001
    p.extend(3 << 27)                                   # + 402.653184 ms
    p.event(p.record(7, b"b" * 200), large=True)        # a length-prefixed event
    p.discarded(24, delta=999_999)                      # its delta does not count
    p.stamp(7_000_000_000)
    p.event(p.record(7, b"c"), delta=500)               # 7.0000005 rounds up
    lines, counts = decode(p, decoder=decoder)
    assert [line.split(": ", 2)[0].rsplit(" ", 1)[1] for line in lines] == ["5.000001", "5.402654", "7.000001"]
    assert lines[1].endswith("b" * 200) and counts["events"] == 3 and counts["bad"] == 0


@pytest.mark.parametrize("decoder", DECODERS)
def test_lost_events_are_a_lost_line_before_the_page(decoder):
    p = Page(timestamp=1_000_000_000, lost=1234)
    p.event(p.record(9, b"after"))
    lines, counts = decode(p, cpu=1, decoder=decoder)
    assert lines[0] == "CPU:1 [LOST 1234 EVENTS]" and counts["lost"] == 1234
    parser = TraceParser()
    parser.feed("\n".join(lines).encode() + b"\n")
    assert parser.stats.lost_events == 1234  # counted as the text pipe's marker is
    p = Page(lost=99, store_lost=False)  # no room for the count: flagged only
    p.event(p.record(9, b"x"))
    lines, counts = decode(p, decoder=decoder)
    assert counts["lost_unknown"] == 1 and counts["lost"] == 0 and not lines[0].startswith("CPU:")


@pytest.mark.parametrize("decoder", DECODERS)
def test_messages_stop_at_nul_and_keep_other_bytes(decoder):
    p = Page()
    p.event(p.record(5, b"stop: pid=5 (nr-gnb)\0garbage"))
    p.event(p.record(5, b"two\nlines \xff\x1b[2J", nul=False))  # as the text pipe: the newline splits it
    text, _ = decoder(bytes(p), FORMAT.params(), 0)
    assert text.split(b"\n") == [b"<...>-5 [000] 0.000000: bpf_trace_printk: stop: pid=5 (nr-gnb)",
                                 b"<...>-5 [000] 0.000000: bpf_trace_printk: two", b"lines \xff\x1b[2J", b""]


@pytest.mark.parametrize("decoder", DECODERS)
def test_other_event_types_are_counted_not_rendered(decoder):
    p = Page()
    p.event(p.record(5, b"marker", event_id=5))
    p.event(p.record(5, b"mine"))
    lines, counts = decode(p, decoder=decoder)
    assert len(lines) == 1 and lines[0].endswith("mine") and counts["other"] == 1


@pytest.mark.parametrize("decoder", DECODERS)
def test_broken_pages_are_counted_and_end_there(decoder):
    good = Page()
    good.event(good.record(5, b"ok"))
    page = bytearray(bytes(good))
    struct.pack_into("<Q", page, 8, 5000)  # a commit past the page
    assert decode(bytes(page), decoder=decoder)[1]["bad"] == 1
    cut = Page()
    cut.event(cut.record(5, b"ok")).event(cut.record(5, b"x" * 40))
    page = bytearray(bytes(cut))
    struct.pack_into("<Q", page, 8, len(cut.data) - 8)  # the last event runs past the commit
    lines, counts = decode(bytes(page), decoder=decoder)
    assert len(lines) == 1 and counts["bad"] == 1
    lines, counts = decode(bytes(good)[:10], decoder=decoder)  # shorter than the header
    assert lines == [] and counts["bad"] == 1


@needs_c
def test_c_refuses_a_format_that_points_outside_the_header():
    bad = dataclasses.replace(FORMAT, commit_offset=4090)
    with pytest.raises(ValueError):
        _rawbuf.decode(bytes(Page()), bad.params(), 0)
    with pytest.raises(ValueError):
        _rawbuf.decode(bytes(Page()), FORMAT.params(), -1)


# --- the reference and the C twin agree --------------------------------------------------------------

formats = st.builds(
    lambda big, c32, kind, size: dataclasses.replace(
        FORMAT, big_endian=big, commit_size=4 if c32 else 8, data_offset=12 if c32 else 16, page_size=size,
        msg_kind=kind, msg_size=24 if kind == FIXED else 4),
    st.booleans(), st.booleans(), st.sampled_from([DATA_LOC, REL_LOC, FIXED]), st.sampled_from([128, 512, 4096]))

ops = st.lists(st.one_of(
    st.tuples(st.just("event"), st.integers(-2, 5_000_000), st.binary(max_size=150), st.integers(0, (1 << 27) - 1),
              st.booleans(), st.sampled_from([550, 550, 550, 5])),
    st.tuples(st.just("extend"), st.integers(0, (1 << 59) - 1)),
    st.tuples(st.just("stamp"), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("discard"), st.integers(0, 64), st.integers(1, 1000)),
), max_size=40)


def build_pages(fmt: RawFormat, plan: list, ts: int, lost: int | None, store: bool) -> bytes:
    pages, p = [], Page(fmt, timestamp=ts, lost=lost, store_lost=store)
    for op in plan:
        before = bytes(p.data)
        if op[0] == "event":
            p.event(p.record(op[1], op[2], event_id=op[5]), op[3], large=op[4])
        elif op[0] == "extend":
            p.extend(op[1])
        elif op[0] == "stamp":
            p.stamp(op[1])
        else:
            p.discarded(op[1], op[2])
        if len(p.data) + fmt.data_offset + 8 > fmt.page_size:  # full: start the next page with it
            p.data = bytearray(before)
            pages.append(bytes(p))
            p = Page(fmt, timestamp=ts)
    pages.append(bytes(p))
    return b"".join(pages)


@needs_c
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=formats, plan=ops, ts=st.integers(0, (1 << 64) - 1), lost=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
       store=st.booleans(), cpu=st.integers(0, 300))
def test_c_equals_python_on_generated_pages(fmt, plan, ts, lost, store, cpu):
    pages = build_pages(fmt, plan, ts, lost, store)
    assert _rawbuf.decode(pages, fmt.params(), cpu) == decode_py(pages, fmt.params(), cpu)


@needs_c
@settings(max_examples=400, deadline=None)
@given(fmt=formats, data=st.binary(max_size=1500), cpu=st.integers(0, 3))
def test_c_equals_python_on_arbitrary_bytes(fmt, data, cpu):
    assert _rawbuf.decode(data, fmt.params(), cpu) == decode_py(data, fmt.params(), cpu)


@settings(max_examples=200, deadline=None)
@given(plan=st.lists(st.tuples(st.integers(1, 4_194_304), st.binary(min_size=1, max_size=60).filter(
    lambda m: b"\0" not in m and b"\n" not in m and b"\r" not in m), st.integers(0, 5_000_000)), max_size=30),
    ts=st.integers(0, 10**15))
def test_generated_events_decode_to_what_was_written(plan, ts):
    """The reference against a model: every event's pid, message and running time, in order."""
    p = Page(timestamp=ts)
    want, now = [], ts
    for pid, msg, delta in plan:
        p.event(p.record(pid, msg), delta)
        now += delta
        want.append((pid, msg, (now + 500) // 1000))
    text, counts = decode_py(bytes(p), FORMAT.params(), 2)
    got = []
    for line in text.split(b"\n")[:-1]:
        head, _, msg = line.partition(b": bpf_trace_printk: ")
        task, _, rest = head.partition(b" [002] ")
        secs, _, usec = rest.partition(b".")
        got.append((int(task.rsplit(b"-", 1)[1]), msg, int(secs) * 1_000_000 + int(usec)))
    assert got == want and counts[1] == len(plan)


# --- reading: a stand-in tree, then the real kernel ---------------------------------------------------

def test_reader_takes_cpus_that_come_and_go(tmp_path, monkeypatch):
    """CPU hotplug cannot be done on this shared machine: a stand-in per_cpu tree of regular files (each
    read returns a page, then end of file, like a drained trace_pipe_raw) checks that a CPU appearing
    later is opened at the next rescan and one whose file goes away is dropped, the rest read on."""
    inst = fake_instance(tmp_path)
    p0, p1 = Page(timestamp=10**9), Page(timestamp=2 * 10**9)
    p0.event(p0.record(11, b"cpu0 line"))
    p1.event(p1.record(12, b"cpu1 line"))
    (inst / "per_cpu/cpu0/trace_pipe_raw").write_bytes(bytes(p0))
    stop = threading.Event()
    reader = RawReader(inst, stop, FORMAT, batch_seconds=0, poll_seconds=0.01)
    try:
        chunks = iter(reader)
        assert b"cpu0 line" in next(chunks)
        (inst / "per_cpu/cpu1").mkdir()
        (inst / "per_cpu/cpu1/trace_pipe_raw").write_bytes(bytes(p1))
        monkeypatch.setattr(rawbuf, "RESCAN", 0.0)
        assert b"[001]" in next(chunks)
        assert reader.stats.events == 2 and set(reader._fds) == {0, 1}
        reader._drop(0, "test")  # what a read failing with ENODEV does
        assert set(reader._fds) == {1}
    finally:
        reader.close()
        reader.close()  # twice is fine
    assert reader._fds == {}


def test_reader_without_any_cpu_is_an_environment_problem(tmp_path):
    inst = fake_instance(tmp_path)
    (inst / "per_cpu/cpu0").rmdir()
    with pytest.raises(EnvironmentProblem, match="no per-CPU ring buffer"):
        RawReader(inst, threading.Event(), FORMAT)


@pytest.fixture
def instance():
    require_root("tracefs needs root")
    from gtp5g_op.trace.tracefs import TraceInstance

    with TraceInstance(f"gtp5g-op-rawtest-{os.getpid()}", buffer_kb=4) as inst:
        (inst.path / "events/bpf_trace/bpf_trace_printk/enable").write_text("0\n")  # only our markers
        yield inst


def test_lost_events_match_the_kernels_overrun_counter(instance):
    """trace_marker writes into a 4 KiB-per-CPU buffer nobody reads: the pages' LOST counts add up to the
    kernel's own overrun counter, and the markers are records of another event type."""
    with open(instance.path / "trace_marker", "w") as marker:
        for i in range(2000):
            marker.write(f"line {i:06d} " + "x" * 80 + "\n")
            marker.flush()
    stop = threading.Event()
    reader = RawReader(instance.path, stop, batch_seconds=0, poll_seconds=0.05)
    try:
        text, _ = reader._drain()
    finally:
        reader.close()
    overruns = instance.overruns()
    parser = TraceParser()
    parser.feed(text)
    assert reader.stats.other > 0 and reader.stats.bad == 0
    assert overruns > 1000
    if reader.stats.lost_unknown == 0:
        assert parser.stats.lost_events == reader.stats.lost == overruns
    else:  # a page too full to hold its count: the overrun counter has it
        assert parser.stats.lost_events < overruns


def test_an_idle_reader_sleeps_and_stops_quickly(instance):
    stop = threading.Event()
    reader = RawReader(instance.path, stop, batch_seconds=0.1)
    out: list[bytes] = []
    cpu0 = time.process_time()
    t = threading.Thread(target=lambda: out.extend(reader), daemon=True)
    t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    stop.set()
    t.join(2)
    reader.close()
    assert not t.is_alive() and time.monotonic() - t0 < 0.5
    assert time.process_time() - cpu0 < 0.1 and out == []
    path = instance.path
    instance.remove()  # nothing holds the instance open any more
    assert not path.exists()
