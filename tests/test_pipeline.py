"""The pipeline with real processes: validation, threads, exits, and memory under pid churn."""

from __future__ import annotations

import os
import time
import tracemalloc

from gtp5g_op.kernel import workload
from gtp5g_op.model import Target
from gtp5g_op.trace.parser import TraceParser
from gtp5g_op.trace.pipeline import Pipeline
from gtp5g_op.trace.validate import ProcessValidator


class Recorder:
    """Keeps every set handed to ``update`` (the pipeline's side of the pusher contract)."""

    def __init__(self) -> None:
        self.sets: list[frozenset[Target]] = []

    def update(self, targets) -> None:
        self.sets.append(frozenset(targets))


def line(pid: int, comm: str = "nr-gnb", ts: float = 1.0) -> bytes:
    return f"{comm}-{pid} [000] ..s21 {ts:.6f}: bpf_trace_printk: stop: pid={pid} ({comm})\n".encode()


def test_unvalidated_targets_are_every_subject_seen():
    pusher = Recorder()
    pipe = Pipeline(TraceParser(), pusher=pusher)
    pipe.feed(line(10) + line(11, "nr-ue") + line(12, "bash"))
    assert {t.pid for t in pipe.targets()} == {10, 11}
    assert pusher.sets[-1] == pipe.targets()


def test_live_process_its_threads_and_its_exit():
    pusher = Recorder()
    pipe = Pipeline(TraceParser(), validator=ProcessValidator(), pusher=pusher)
    with workload.start("nr-gnb", threads=3, rate=5) as wl:
        pipe.feed(line(wl.ready.tids[0]))
        targets = {t.pid for t in pusher.sets[-1]}
        assert targets == {wl.pid, *wl.ready.tids}, "the traced thread's process and all its threads"
        report = pipe.report()
        assert {p["pid"] for p in report["processes"] if p["from_threads"]} == targets - {wl.ready.tids[0]}
    deadline = time.monotonic() + 5
    while pipe.targets() and time.monotonic() < deadline:
        time.sleep(0.05)
        pipe.refresh()
    assert pipe.targets() == frozenset() and pusher.sets[-1] == frozenset()
    # What was seen stays in the report, marked exited (issue 10 h).
    report = pipe.report()["processes"]
    assert {p["pid"] for p in report} == targets and all(p["exited"] and p["valid"] for p in report)
    # Lines read after the exit (the tracer's aggregated counts come at the next flush) still count for it:
    # nobody has that pid now. They used to drop the record and re-check the pid: "dead", forgotten.
    before = {p["pid"]: p["events"] for p in report}
    pipe.feed(line(wl.ready.tids[0], ts=2.0))
    after = {p["pid"]: p for p in pipe.report()["processes"]}
    assert after.keys() == before.keys() and after[wl.ready.tids[0]]["events"] == before[wl.ready.tids[0]] + 1
    assert after[wl.ready.tids[0]]["exited"] and not pipe.rejected


def test_unknown_comm_of_a_live_thread_is_named_from_proc():
    """A `<...>` task column (comm not cached by the kernel) still finds the live nr-gnb thread."""
    from gtp5g_op.trace.watch import WatchOptions, build_pipeline

    pusher = Recorder()
    pipe = build_pipeline(WatchOptions(threads=False), pusher=pusher)
    with workload.start("nr-gnb", threads=2, rate=5) as wl:
        tid = wl.ready.tids[1]
        pipe.feed(f"<...>-{tid} [000] ..s21 1.000000: bpf_trace_printk: fentry/gtp5g_encap_recv: "
                  f"PID={tid}, TGID={wl.pid}, CPU=0\n<...>-{os.getpid()} [000] ..s21 1.0: bpf_trace_printk: x\n"
                  .encode())
        assert pusher.sets[-1] == {Target(tid, wl.pid, "nr-gnb")}
    no_validate = build_pipeline(WatchOptions(validate=False))
    no_validate.feed(f"<...>-{tid} [000] ..s21 1.000000: bpf_trace_printk: x\n".encode())
    assert no_validate.targets() == frozenset()


def test_memory_stays_flat_under_100k_distinct_pids():
    """100 000 distinct target pids that are not alive here: none is kept, memory does not grow."""
    pipe = Pipeline(TraceParser(), validator=ProcessValidator(cache_size=1024))
    base = 4_000_000  # above any pid this machine hands out (pid_max is at most 4194304)
    tracemalloc.start()
    for chunk in range(100):
        pipe.feed(b"".join(line(base + chunk * 1000 + i) for i in range(1000)))
        if chunk == 9:
            after_10k = tracemalloc.get_traced_memory()[0]
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert pipe.parser.stats.matched == 100_000
    assert pipe.records == {} and pipe.rejected == {"dead": 100_000}
    assert current - after_10k < 512 * 1024, "memory grew with the number of pids"
    assert peak < 16 * 1024 * 1024


def test_report_counts_distinct_rejected_subjects_and_every_failed_check():
    """A dead pid named again (as a paced replay does) is one rejected subject, checked twice."""
    proc = workload.start("nr-gnb", threads=0)
    pid = proc.pid
    proc.stop()  # a pid that existed a moment ago and is gone now
    pipe = Pipeline(TraceParser(), validator=ProcessValidator())
    pipe.feed(line(pid))
    pipe.refresh()
    pipe.feed(line(pid, ts=2.0))
    report = pipe.report()
    assert report["processes"] == []
    assert report["rejected"] == {"dead": 1} and report["rejections"] == {"dead": 2}
