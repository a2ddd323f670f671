"""The trace parser: every line format of the reference, robustness, and the C accelerator's equivalence."""

from __future__ import annotations

import json
import re

import pytest
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gtp5g_op.trace.parser import MAX_LINE, Event, TraceParser, parse_line, render

TRACES = sorted((FIXTURES / "traces").glob("*.trace"))
HAVE_ACCEL = TraceParser().accelerated


def summary(parser: TraceParser, updates) -> dict:
    """Fold updates into {(pid, comm): (tgid, count, first, last, hooks)} plus stats."""
    out: dict = {}
    for u in updates:
        key = (u.pid, u.comm)
        tgid, n, first, last, hooks = out.get(key, (None, 0, u.first_ts, u.last_ts, set()))
        out[key] = (u.tgid if u.tgid is not None else tgid, n + u.count, min(first, u.first_ts),
                    max(last, u.last_ts), hooks | u.hooks)
    return {"subjects": out, "stats": parser.stats.as_json()}


def run(data: bytes, accelerate: bool, match: str | None = None, splits: list[int] | None = None) -> dict:
    parser = TraceParser(match, accelerate=accelerate) if match else TraceParser(accelerate=accelerate)
    updates = []
    last = 0
    for cut in sorted(splits or []):
        updates += parser.feed(data[last:cut])
        last = cut
    updates += parser.feed(data[last:])
    updates += parser.finish()
    return summary(parser, updates)


def one(line: str) -> Event:
    ev = parse_line(line.encode())
    assert ev is not None, line
    return ev


# --- the formats of the reference ------------------------------------------------------------
def test_gtp5g_tracer_line():
    ev = one("nr-gnb-1150369 [005] ..s21 34202.967772: bpf_trace_printk: fentry/gtp5g_encap_recv: "
             "PID=1150369, TGID=1150348, CPU=5")
    assert (ev.comm, ev.pid, ev.cpu, ev.flags, ev.timestamp) == ("nr-gnb", 1150369, 5, "..s21", 34202.967772)
    assert (ev.event, ev.hook, ev.rule) == ("bpf_trace_printk", "fentry/gtp5g_encap_recv", 2)
    assert (ev.subject_pid, ev.subject_tgid, ev.subject_comm) == (1150369, 1150348, "nr-gnb")


def test_idle_softirq_is_no_subject():
    ev = one("<idle>-0       [001] b.s31 34202.971370: bpf_trace_printk: fentry/gtp5g_push_header: "
             "PID=0, TGID=0, LEN=84")
    assert ev.comm == "<idle>" and ev.pid == 0 and ev.subject_pid is None


def test_scheduler_line_names_subject_in_message():
    ev = one("<idle>-0 [005] d.h51 21039.908232: bpf_trace_printk: enqueue: pid=365189 (nr-gnb)")
    assert (ev.subject_pid, ev.subject_comm, ev.rule, ev.hook) == (365189, "nr-gnb", 1, "enqueue")


def test_name_runs_to_last_paren():
    ev = one("x-1 [000] .... 1.000000: bpf_trace_printk: stop: pid=444 (x) pid=9 (nr-ue)")
    assert (ev.subject_pid, ev.subject_comm) == (444, "x) pid=9 (nr-ue")


def test_pid_inside_word_is_not_rule1():
    ev = one("iperf3-7 [000] .... 1.000000: bpf_trace_printk: fork: ppid=77 (bash) pid=78 (nr-ue)")
    assert (ev.subject_pid, ev.subject_comm) == (78, "nr-ue")


def test_unclosed_name_falls_back_to_task_column():
    ev = one("nr-ue-12 [000] .... 1.000000: bpf_trace_printk: enqueue: pid=13 (nr-ue")
    assert (ev.subject_pid, ev.subject_comm, ev.rule) == (12, "nr-ue", 3)


@pytest.mark.parametrize(
    ("column", "comm", "pid"),
    [
        ("kworker/u16:2-1234", "kworker/u16:2", 1234),
        ("Chrome_IOThread-77", "Chrome_IOThread", 77),
        ("a b-c [1]-42", "a b-c [1]", 42),
        ("pid=1 pid=2-99", "pid=1 pid=2", 99),
        ("Chrome_IOThread-1234567", "Chrome_IOThread", 1234567),
        ("<...>-1234", "<...>", 1234),
        ("a (b)-5", "a (b)", 5),
        ("-8", "", 8),
    ],
)
def test_task_column_comms(column, comm, pid):
    ev = one(f"{column:>16s} [003] d..31 1.000000: bpf_trace_printk: hello")
    assert (ev.comm, ev.pid, ev.subject_pid, ev.subject_comm) == (comm, pid, pid, comm)


@pytest.mark.parametrize(("col", "tgid"), [("(1150348)", 1150348), ("(-------)", None), ("(   4711)", 4711)])
def test_record_tgid_column(col, tgid):
    ev = one(f"nr-gnb-1150369 {col} [005] ..s21 34202.967769: bpf_trace_printk: fentry/x: DEV=n3")
    assert (ev.pid, ev.tgid, ev.subject_tgid) == (1150369, tgid, tgid)


@pytest.mark.parametrize(
    "line",
    [
        "<...>-1234 [000] d... 12345.678901: 0x00000001: stop: pid=365012 (nr-ue)",
        "nr-ue-1 [000] d... 12345.678901: <...>: 0x00000001: stop: pid=365012 (nr-ue)",
        "nr-ue-1 [000] 12345.678901: bpf_trace_printk: stop: pid=365012 (nr-ue)",
    ],
)
def test_older_event_prefixes(line):
    ev = one(line)
    assert (ev.message, ev.subject_pid, ev.subject_comm) == ("stop: pid=365012 (nr-ue)", 365012, "nr-ue")


def test_our_tracer_format():
    ev = one("nr-gnb-2001 [000] ..s21 100.000001: bpf_trace_printk: fentry/gtp5g_encap_recv: PID=2001, "
             "TGID=2000, CPU=0, LEN=108, DEV=n3, TEID=0x00000001")
    assert (ev.hook, ev.subject_pid, ev.subject_tgid) == ("fentry/gtp5g_encap_recv", 2001, 2000)


AGG = ("nr-gnb-2001 [000] ..s21 100.000001: bpf_trace_printk: fentry/gtp5g_encap_recv: N={n}, PID=2001, "
       "TGID=2000, CPU=0, LEN=108, DEV=n3")


@pytest.mark.parametrize(("n", "count"), [("1", 1), ("17", 17), ("9999999999", 9999999999),
                                          ("0", 1), ("012", 1), ("12345678901", 1), ("5x", 1), ("", 1)])
def test_aggregated_line_count(n, count):
    ev = one(AGG.format(n=n))
    assert (ev.count, ev.hook, ev.subject_pid, ev.subject_tgid) == (count, "fentry/gtp5g_encap_recv", 2001, 2000)


@pytest.mark.parametrize("accel", sorted({False, HAVE_ACCEL}))
def test_aggregated_lines_add_their_counts_to_old_format_lines(accel):
    data = "\n".join([AGG.format(n=1), AGG.format(n=999), AGG.replace("N={n}, ", ""),
                      # the residual a detaching tracer prints for the thread: rule 1, comm kept by the kernel
                      "gtp5g-op-77 [001] ...11 101.5: bpf_trace_printk: fentry/gtp5g_encap_recv: N=3, TGID=2000, "
                      "pid=2001 (nr-gnb)", ""]).encode()
    res = run(data, accel)
    assert res["subjects"] == {(2001, "nr-gnb"): (2000, 1004, 100.000001, 101.5, {"fentry/gtp5g_encap_recv"})}
    assert res["stats"] == {"lines": 4, "events": 1004, "matched": 1004, "malformed": 0, "lost_events": 0}


@pytest.mark.parametrize("msg", [
    "fentry/x: PID=2001, TGID=2000, N=50",         # N= elsewhere than right after the hook
    "N=50, PID=2001, TGID=2000",                   # no hook
    "stop: pid=2001 (nr-gnb N=50)",                # a comm cannot say N=
    "fentry/x:  N=50, PID=2001, TGID=2000",
])
def test_count_only_right_after_the_hook(msg):
    assert one(f"nr-gnb-2001 [000] .... 1.0: bpf_trace_printk: {msg}").count == 1


@pytest.mark.parametrize(
    "line",
    [b"", b"hello", b"CPU:3 [LOST 1234 EVENTS]", b"nr-gnb-99999999 [000] .... 1.0: e: m",
     b"nr-gnb-1 [000] .... 1.0 e: m", b"\x00\xff", b"nr-gnb-1 [x] .... 1.0: e: m"],
)
def test_not_event_lines(line):
    assert parse_line(line) is None


def test_lost_blank_comment_and_malformed_counts():
    data = b"CPU:3 [LOST 1234 EVENTS]\n\n   \n# tracer: nop\ngarbage\nCPU:1 [LOST 6 EVENTS]\r\n"
    for accel in {False, HAVE_ACCEL}:
        assert run(data, accel)["stats"] == {"lines": 6, "events": 0, "matched": 0, "malformed": 1, "lost_events": 1240}


def test_comm_is_matched_whole():
    data = (b"<idle>-0 [0] .... 1.0: bpf_trace_printk: enqueue: pid=5 (nr-gnb-worker)\n"
            b"<idle>-0 [0] .... 1.0: bpf_trace_printk: enqueue: pid=6 (nr-gnb [1])\n"
            b"<idle>-0 [0] .... 1.0: bpf_trace_printk: enqueue: pid=7 (nr-gnb)\n")
    assert list(run(data, False)["subjects"]) == [(7, "nr-gnb")]


def test_match_is_configuration():
    data = b"iperf3-5 [0] .... 1.0: bpf_trace_printk: x\nnr-gnb-6 [0] .... 1.0: bpf_trace_printk: x\n"
    assert list(run(data, False, match="iperf3")["subjects"]) == [(5, "iperf3")]


def test_bad_match_regex_is_usage_error():
    from gtp5g_op.errors import UsageError

    with pytest.raises(UsageError):
        TraceParser("(")


UNKNOWN = (b"<...>-41 [001] ..s21 5.000000: bpf_trace_printk: fentry/gtp5g_encap_recv: PID=41, TGID=40, CPU=1\n"
           b"<...>-42 [001] ..s21 5.500000: bpf_trace_printk: fentry/gtp5g_encap_recv: PID=42, TGID=40, CPU=1\n"
           b"<...>-43 [001] ..s21 6.000000: bpf_trace_printk: stop: x\n"
           b"nr-gnb-41 [001] ..s21 7.000000: bpf_trace_printk: fexit/gtp5g_encap_recv: PID=41, TGID=40, CPU=1\n")


@pytest.mark.parametrize("accel", sorted({False, HAVE_ACCEL}))
def test_unknown_comm_is_named_by_the_resolver(accel):
    """`<...>` subjects take their comm from resolve_comm (live: /proc), then must match like any other."""
    names = {41: "nr-gnb", 42: "bash"}  # 43 has exited: no name
    parser = TraceParser(accelerate=accel, resolve_comm=names.get)
    got = summary(parser, parser.feed(UNKNOWN[:150]) + parser.feed(UNKNOWN[150:]) + parser.finish())
    assert got["subjects"] == {(41, "nr-gnb"): (40, 2, 5.0, 7.0, {"fentry/gtp5g_encap_recv",
                                                                  "fexit/gtp5g_encap_recv"})}
    assert got["stats"]["matched"] == 2 and got["stats"]["events"] == 4


def test_unknown_comm_is_asked_once_per_ttl(monkeypatch):
    """/proc is asked once per pid per NAME_TTL, however many chunks name it; a later rename is seen."""
    import gtp5g_op.trace.parser as tp

    clock = [100.0]
    monkeypatch.setattr(tp.time, "monotonic", lambda: clock[0])
    asked: list[int] = []
    names = {41: "nr-gnb"}

    def resolve(pid: int) -> str | None:
        asked.append(pid)
        return names.get(pid)

    parser = TraceParser(resolve_comm=resolve)
    first = UNKNOWN.split(b"\n")[0] + b"\n"
    for _ in range(5):
        assert [(u.pid, u.comm) for u in parser.feed(first)] == [(41, "nr-gnb")]
    assert asked == [41]
    names[41] = "nr-ue"
    clock[0] += tp.NAME_TTL + 0.01
    assert [(u.pid, u.comm) for u in parser.feed(first)] == [(41, "nr-ue")]
    assert asked == [41, 41]


def test_unknown_comm_of_a_pid_gone_since_keeps_its_last_name(monkeypatch):
    """Lines read after their thread exited (the raw reader names every task from /proc) still count for
    it: a pid /proc no longer has keeps the name it last had; one never seen alive stays unknown."""
    import gtp5g_op.trace.parser as tp

    clock = [100.0]
    monkeypatch.setattr(tp.time, "monotonic", lambda: clock[0])
    names = {41: "nr-gnb"}
    parser = TraceParser(resolve_comm=names.get)
    first = UNKNOWN.split(b"\n")[0] + b"\n"
    assert [(u.pid, u.comm) for u in parser.feed(first)] == [(41, "nr-gnb")]
    del names[41]  # exited
    clock[0] += tp.NAME_TTL + 0.01
    assert [(u.pid, u.comm, u.count) for u in parser.feed(first * 3)] == [(41, "nr-gnb", 3)]
    assert parser.feed(UNKNOWN.split(b"\n")[2] + b"\n") == []  # 43: gone before it was ever named


@pytest.mark.parametrize("accel", sorted({False, HAVE_ACCEL}))
def test_unknown_comm_without_resolver_is_no_target(accel):
    """Replay and --no-validate have nothing to ask: `<...>` stays unknown and is never a target."""
    res = run(UNKNOWN, accel)
    assert list(res["subjects"]) == [(41, "nr-gnb")] and res["stats"]["matched"] == 1
    assert sorted(run(UNKNOWN, accel, match=r"<\.\.\.>")["subjects"]) == [(41, "<...>"), (42, "<...>"), (43, "<...>")]


# --- robustness --------------------------------------------------------------------------------
@pytest.mark.parametrize("accel", sorted({False, HAVE_ACCEL}))
def test_one_megabyte_line_nul_crlf_and_partial_tail(accel):
    good = b"nr-gnb-7 [000] .... 5.000000: bpf_trace_printk: stop: pid=7 (nr-gnb)"
    data = b"x" * (1 << 20) + b"\n" + good + b"\r\n\x00\x00\n" + good
    res = run(data, accel, splits=[1000, 500_000, (1 << 20) + 3])
    assert res["stats"] == {"lines": 4, "events": 2, "matched": 2, "malformed": 2, "lost_events": 0}
    assert res["subjects"][(7, "nr-gnb")][1] == 2


def test_overlong_partial_line_memory_is_bounded():
    parser = TraceParser()
    for _ in range(20):
        parser.feed(b"y" * (MAX_LINE // 4))
    assert len(parser._tail) <= MAX_LINE
    parser.feed(b"\nnr-ue-3 [0] .... 1.0: e: m\n")
    assert parser.stats.malformed == 1 and parser.stats.matched == 1


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.name)
@pytest.mark.parametrize("accel", sorted({False, HAVE_ACCEL}))
def test_fixture_traces_match_expected(path, accel):
    from gtp5g_op.trace.watch import WatchOptions, run_watch

    expected = json.loads(path.with_suffix(".expected.json").read_text())
    result = run_watch(WatchOptions(replay=str(path), validate=False, accelerate=accel))
    assert json.loads(json.dumps(result.report)) == expected


# --- properties --------------------------------------------------------------------------------
COMM_ALPHABET = st.sampled_from(list("abcnrgbue-_/[]()= <>.:0123456789") + ["é", "ß"])
comms = st.text(COMM_ALPHABET, max_size=15).filter(
    lambda c: not c.startswith(" ") and len(c.encode()) <= 15 and not re.search(r"-\d+ ", c)
)
messages = st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), max_size=80).filter(
    lambda m: not m.startswith("0x")
)
events = st.builds(
    Event,
    comm=comms,
    pid=st.integers(0, 4194304),
    tgid=st.none() | st.integers(1, 4194304),
    cpu=st.integers(0, 999),
    flags=st.text(st.sampled_from(list(".dDhHsSbBNz0123456789")), max_size=5),
    timestamp=st.integers(0, 10**12).map(lambda us: us / 1e6),
    event=st.sampled_from(["bpf_trace_printk", "sched_switch", "<...>"]),
    message=messages,
    hook=st.none(),
    subject_pid=st.none(),
    subject_tgid=st.none(),
    subject_comm=st.just(""),
    rule=st.just(0),
)
PRINTED = ("comm", "pid", "tgid", "cpu", "flags", "timestamp", "event", "message")


@given(events)
@settings(max_examples=400)
def test_parse_render_round_trip(ev):
    back = parse_line(render(ev))
    assert back is not None
    assert {f: getattr(back, f) for f in PRINTED} == {f: getattr(ev, f) for f in PRINTED}


@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=6))
@settings(max_examples=300)
def test_arbitrary_bytes_never_raise(data, splits):
    res = run(data, False, splits=[s for s in splits if s <= len(data)])
    st_ = res["stats"]
    assert st_["malformed"] <= st_["lines"] and 0 <= st_["matched"] <= st_["events"]


TEMPLATES = [
    b"nr-gnb-{p} [00{c}] ..s21 {t}: bpf_trace_printk: fentry/gtp5g_encap_recv: PID={p}, TGID={q}, CPU={c}",
    b"<idle>-0 [00{c}] d.h51 {t}: bpf_trace_printk: enqueue: pid={p} (nr-ue)",
    b"nr-ue-{p} ({q}) [00{c}] ..s21 {t}: bpf_trace_printk: fexit/pdr_find_by_gtp1u: PID={p}, PDR=Found",
    b"iperf3-{p} [00{c}] ..s21 {t}: bpf_trace_printk: stop: pid={q} (nr-gnb)",
    b"nr-gnb-{p} [00{c}] {t}: 0x00000001: stop: pid={p} (nr-gnb) x",
    b"CPU:{c} [LOST {p} EVENTS]",
    b"nr-gnb-{p} [00{c}] ..s21 {t}: bpf_trace_printk: fentry/gtp5g_encap_recv: N={q}, PID={p}, TGID={q}, CPU={c}",
    b"nr-ue-{p} [00{c}] ..s21 {t}: bpf_trace_printk: kprobe/ip4_find_route: N={c}{p}, PID={p}, TGID={q}, DEV=-",
    b"gtp5g-op-{q} [00{c}] ...11 {t}: bpf_trace_printk: fexit/policePacket: N={q}, TGID={q}, pid={p} (nr-gnb)",
    b"",
]
lines = st.builds(
    lambda tpl, p, q, c, t: tpl.replace(b"{p}", str(p).encode()).replace(b"{q}", str(q).encode())
    .replace(b"{c}", str(c).encode()).replace(b"{t}", f"{t / 1e6:.6f}".encode()),
    st.sampled_from(TEMPLATES), st.integers(0, 9_999_999), st.integers(0, 5_000_000), st.integers(0, 9),
    st.integers(0, 10**11),
)


def mutate(line: bytes, data: st.DataObject) -> bytes:
    if not line or not data.draw(st.booleans()):
        return line
    i = data.draw(st.integers(0, len(line) - 1))
    op = data.draw(st.sampled_from(["drop", "dup", "byte"]))
    if op == "drop":
        return line[:i] + line[i + 1:]
    if op == "dup":
        return line[:i] + line[i:i + 1] * 2 + line[i + 1:]
    return line[:i] + bytes([data.draw(st.integers(0, 255))]) + line[i + 1:]


@pytest.mark.skipif(not HAVE_ACCEL, reason="the C accelerator is not built (no C compiler at install)")
@given(st.lists(lines, max_size=40), st.data(), st.sampled_from(["", "\r"]), st.booleans())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_accelerator_equals_python(lines_, data, eol, trailing):
    body = b"\n".join(mutate(x, data) + eol.encode() for x in lines_) + (b"\n" if trailing else b"")
    splits = data.draw(st.lists(st.integers(0, len(body)), max_size=4))
    assert run(body, True, splits=splits) == run(body, False)


@pytest.mark.skipif(not HAVE_ACCEL, reason="the C accelerator is not built (no C compiler at install)")
@given(st.lists(lines, max_size=30), st.data())
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_accelerator_equals_python_when_naming_unknown_comms(lines_, data):
    body = b"\n".join(re.sub(rb"^[a-z-]+?-(\d+) ", rb"<...>-\1 ", x) if data.draw(st.booleans()) else x
                      for x in lines_) + b"\n"
    names = lambda pid: ("nr-gnb", "nr-ue", "bash", None)[pid % 4]  # noqa: E731

    def go(accel: bool) -> dict:
        parser = TraceParser(accelerate=accel, resolve_comm=names)
        return summary(parser, parser.feed(body) + parser.finish())

    assert go(True) == go(False)


@pytest.mark.skipif(not HAVE_ACCEL, reason="the C accelerator is not built (no C compiler at install)")
@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_accelerator_equals_python_on_any_bytes(data):
    assert run(data, True) == run(data, False)


@pytest.mark.skipif(not HAVE_ACCEL, reason="the C accelerator is not built (no C compiler at install)")
def test_accelerator_spills_when_tables_fill():
    """More distinct subjects and hooks than the C tables hold, and a hook longer than they store."""
    rows = [f"nr-gnb-{p} [000] .... {p}.5: bpf_trace_printk: h{p % 100}: x".encode() for p in range(1, 5000)]
    rows.append(b"nr-gnb-1 [000] .... 1.0: bpf_trace_printk: " + b"h" * 150 + b": long hook")
    data = b"\n".join(rows) + b"\n"
    assert run(data, True) == run(data, False)
