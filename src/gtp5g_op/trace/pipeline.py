"""The one pipeline behind replay and live watching: parser → tracker → validator → pusher → metrics."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from gtp5g_op.model import ProcessRecord, Target
from gtp5g_op.trace.parser import Stats, SubjectUpdate, TraceParser

log = logging.getLogger(__name__)


# Rejections about a process that no longer exists (or never will be one): not kept as records.
FORGET_AT_ONCE = frozenset({"dead", "idle", "reused"})
REJECTED_SUBJECTS_MAX = 1000  # distinct rejected subjects remembered per reason (memory stays flat)


class Validator(Protocol):
    """What the pipeline needs from gtp5g_op.trace.validate.ProcessValidator."""

    def check(self, pid: int, comm: str, tgid: int | None = None, seen_at: float | None = None) -> Any: ...

    def threads(self, tgid: int) -> list[Target]: ...

    def still_alive(self, pid: int, create_time: float | None) -> bool: ...


class Pusher(Protocol):
    """What the pipeline needs from gtp5g_op.gthulhu.sync.StrategyPusher."""

    def update(self, targets: Any) -> None: ...


class Pipeline:
    """Turns trace bytes into the set of validated target threads, and hands that set to a pusher.

    ``validator=None`` trusts the trace (``--no-validate``). With a validator, a subject counts only once
    the live process checks pass; with ``threads=True`` every thread of a valid process is a target.
    """

    def __init__(
        self,
        parser: TraceParser,
        validator: Validator | None = None,
        pusher: Pusher | None = None,
        metrics: Any = None,
        threads: bool = True,
    ):
        self.parser = parser
        self.validator = validator
        self.pusher = pusher
        self.metrics = metrics
        self.threads = threads and validator is not None
        self.records: dict[tuple[int, str], ProcessRecord] = {}
        self.rejected: dict[str, int] = {}  # rejections by reason code (a forgotten subject may recur)
        self.rejected_subjects: dict[str, set[tuple[int, str]]] = {}  # distinct subjects, bounded
        self._sent: frozenset[Target] | None = None
        self._reported = Stats()
        self.overruns: int | None = None  # lines the trace instance overwrote (live, private instance)
        self.boot_clock = False  # trace timestamps are CLOCK_BOOTTIME: pass them to pid-reuse checks
        self.tracer: list[dict] | None = None  # per-program report of the loaded tracer
        self.garbage_warned = False  # the "not a trace" warning was given while reading

    # --- input -------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Parse a chunk of trace bytes and fold what it says into the tracked records."""
        self._apply(self.parser.feed(data))

    def finish(self) -> None:
        """End of input: parse a last partial line."""
        self._apply(self.parser.finish())

    def _apply(self, updates: list[SubjectUpdate]) -> None:
        changed = False
        for upd in updates:
            key = (upd.pid, upd.comm)
            rec = self.records.get(key)
            if rec is None:
                rec = ProcessRecord(upd.pid, upd.tgid, upd.comm, first_seen=upd.first_ts, last_seen=upd.last_ts)
                changed |= self._validate(rec, upd.first_ts)
                if rec.valid is False and rec.reason_code in FORGET_AT_ONCE:
                    continue  # nothing left to track: memory stays flat under pid churn
                self.records[key] = rec
            elif rec.events == 0:  # a thread added before the trace named it
                rec.first_seen, rec.last_seen = upd.first_ts, upd.last_ts
            rec.events += upd.count
            rec.first_seen = min(rec.first_seen, upd.first_ts)
            rec.last_seen = max(rec.last_seen, upd.last_ts)
            rec.hooks |= upd.hooks
            if upd.tgid is not None and rec.tgid is None:
                rec.tgid = upd.tgid
        if changed:
            self.publish()
        self._report_metrics()

    def _validate(self, rec: ProcessRecord, seen_at: float) -> bool:
        """Check a new record; True when it adds targets."""
        if self.validator is None:
            rec.valid = None
            return True
        verdict = self.validator.check(rec.pid, rec.comm, rec.tgid, seen_at=seen_at if self.boot_clock else None)
        rec.valid, rec.reason, rec.reason_code = bool(verdict.ok), verdict.reason, verdict.code
        if not verdict.ok:
            self.rejected[verdict.code] = self.rejected.get(verdict.code, 0) + 1
            subjects = self.rejected_subjects.setdefault(verdict.code, set())
            if len(subjects) < REJECTED_SUBJECTS_MAX:
                subjects.add((rec.pid, rec.comm))
            if self.metrics is not None:
                self.metrics.observe_rejected([verdict.code])
            log.info("rejected pid %d (%s): %s", rec.pid, rec.comm, verdict.reason)
            return False
        rec.tgid = verdict.tgid or rec.tgid
        rec.create_time = verdict.create_time
        if self.threads and rec.tgid:
            self._add_threads(rec.tgid)
        return True

    def _add_threads(self, tgid: int) -> None:
        for t in self.validator.threads(tgid):  # type: ignore[union-attr]
            key = (t.pid, t.comm)
            if key not in self.records:
                verdict = self.validator.check(t.pid, t.comm, tgid)  # type: ignore[union-attr]
                if verdict.ok:
                    self.records[key] = ProcessRecord(
                        t.pid, tgid, t.comm, valid=True, create_time=verdict.create_time, from_threads=True
                    )

    # --- periodic ----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Forget processes that exited, pick up new threads of targets, and publish the set."""
        if self.validator is not None:
            for key, rec in list(self.records.items()):
                if not self.validator.still_alive(rec.pid, rec.create_time):
                    del self.records[key]
            if self.threads:
                for tgid in {r.tgid for r in self.records.values() if r.valid and r.tgid}:
                    self._add_threads(tgid)
        self.publish()
        self._report_metrics()

    def targets(self) -> frozenset[Target]:
        """Threads to favour: every valid (or, unvalidated, every seen) target subject."""
        return frozenset(
            Target(r.pid, r.tgid, r.comm) for r in self.records.values() if r.valid is not False
        )

    def publish(self) -> None:
        """Give the pusher the current set when it changed since the last call."""
        current = self.targets()
        if self.pusher is not None and current != self._sent:
            self.pusher.update(current)
        self._sent = current

    def _report_metrics(self) -> None:
        if self.metrics is None:
            return
        st, old = self.parser.stats, self._reported
        self.metrics.observe_parse(
            st.lines - old.lines,
            st.events - old.events,
            st.matched - old.matched,
            st.malformed - old.malformed,
            st.lost_events - old.lost_events,
        )
        self._reported = Stats(st.lines, st.events, st.matched, st.malformed, st.lost_events)
        valid = [r for r in self.records.values() if r.valid is not False]
        self.metrics.set_tracked(len({r.tgid or r.pid for r in valid}), len(valid))

    # --- output ------------------------------------------------------------------------------
    def report(self) -> dict:
        """The ``--json`` document: processes sorted by pid, and parse statistics."""
        procs = sorted(self.records.values(), key=lambda r: (r.pid, r.comm))
        doc = {
            "processes": [r.as_json() | self._validity(r) for r in procs],
            "stats": self.parser.stats.as_json(),
        }
        if self.overruns is not None:
            doc["stats"]["overruns"] = self.overruns
        if self.rejected:
            doc["rejected"] = dict(sorted(self.rejected.items()))
        if self.tracer is not None:
            doc["tracer"] = self.tracer
        return doc

    def _validity(self, rec: ProcessRecord) -> dict:
        if self.validator is None:
            return {}
        return {"valid": rec.valid, "reason": rec.reason, "code": rec.reason_code or None,
                "from_threads": rec.from_threads}
