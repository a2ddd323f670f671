"""The one pipeline behind replay and live watching: parser → tracker → validator → pusher → metrics."""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from typing import Any, Protocol

from gtp5g_op.model import ProcessRecord, Target
from gtp5g_op.trace.parser import Stats, SubjectUpdate, TraceParser

log = logging.getLogger(__name__)


# Rejections about a process that no longer exists (or never will be one): not kept as records.
FORGET_AT_ONCE = frozenset({"dead", "idle", "reused"})
# Bounds under pid churn: records of processes that exited after being valid (kept for the report) and
# of live rejected subjects; the oldest go first. Re-checks of live records per refresh.
MAX_EXITED = 1024
MAX_REJECTED = 4096
RECHECKS_PER_REFRESH = 256
REJECTED_SUBJECTS_MAX = 1000  # distinct rejected subjects remembered per reason, for the explanation


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
        self.rejected: dict[str, int] = {}  # rejections by reason code (a subject may recur)
        self.rejected_subjects: dict[str, set[tuple[int, str]]] = {}  # distinct, bounded
        self._exited: OrderedDict[tuple[int, str], None] = OrderedDict()  # keys of exited records, oldest first
        self._rejected_keys: OrderedDict[tuple[int, str], None] = OrderedDict()  # live rejected records
        self.exited_forgotten = 0  # exited records dropped to stay within MAX_EXITED
        self._recheck = itertools.count()
        self._sent: frozenset[Target] | None = None
        self._reported = Stats()
        self.overruns: int | None = None  # lines the trace instance overwrote (live, private instance)
        self.boot_clock = False  # trace timestamps are CLOCK_BOOTTIME: pass them to pid-reuse checks
        self.tracer: list[dict] | None = None  # per-program report of the loaded tracer
        self.garbage_warned = False  # the "not a trace" warning was given while reading
        self.reader: dict | None = None  # how a live private instance was read (mode, raw decoding counts)

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
            if rec is not None and self._superseded(rec):
                self._drop(key)  # that process is gone: this line is about whoever has the pid now
                rec = None
            if rec is None:
                rec = ProcessRecord(upd.pid, upd.tgid, upd.comm, first_seen=upd.first_ts, last_seen=upd.last_ts)
                changed |= self._validate(rec, upd.first_ts)
                if rec.valid is False and rec.reason_code in FORGET_AT_ONCE:
                    continue  # nothing left to track: memory stays flat under pid churn
                self._keep(key, rec)
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

    def _superseded(self, rec: ProcessRecord) -> bool:
        """True when a new line naming ``rec``'s pid is about another process than ``rec``'s.

        An exited record keeps its late lines (the tracer's flushed counts) while nobody has the pid.
        """
        if rec.exited:
            return self.validator.still_alive(rec.pid, None)  # type: ignore[union-attr]
        return rec.valid is False and self._replaced(rec)

    def _replaced(self, rec: ProcessRecord) -> bool:
        """True when the process a record is about is no longer the one with its pid."""
        return not self.validator.still_alive(rec.pid, rec.create_time)  # type: ignore[union-attr]

    def _keep(self, key: tuple[int, str], rec: ProcessRecord) -> None:
        self.records[key] = rec
        if rec.valid is False:
            self._rejected_keys[key] = None
            while len(self._rejected_keys) > MAX_REJECTED:  # a flood of live spoofers: forget the oldest
                self._drop(next(iter(self._rejected_keys)))

    def _drop(self, key: tuple[int, str]) -> None:
        self.records.pop(key, None)
        self._rejected_keys.pop(key, None)
        self._exited.pop(key, None)

    def _reject(self, rec: ProcessRecord, verdict: Any) -> None:
        rec.valid, rec.reason, rec.reason_code = False, verdict.reason, verdict.code
        rec.create_time = verdict.create_time
        self.rejected[verdict.code] = self.rejected.get(verdict.code, 0) + 1
        subjects = self.rejected_subjects.setdefault(verdict.code, set())
        if len(subjects) < REJECTED_SUBJECTS_MAX:
            subjects.add((rec.pid, rec.comm))
        if self.metrics is not None:
            self.metrics.observe_rejected([verdict.code])
        # Gone processes are churn (debug); a live subject refused is worth saying (info).
        log.log(logging.DEBUG if verdict.code in FORGET_AT_ONCE else logging.INFO,
                "rejected pid %d (%s): %s", rec.pid, rec.comm, verdict.reason)

    def _validate(self, rec: ProcessRecord, seen_at: float | None) -> bool:
        """Check a new (or re-checked) record; True when it adds targets."""
        if self.validator is None:
            rec.valid = None
            return True
        verdict = self.validator.check(rec.pid, rec.comm, rec.tgid, seen_at=seen_at if self.boot_clock else None)
        if self.boot_clock and seen_at is not None and log.isEnabledFor(logging.DEBUG):
            lag = time.clock_gettime(time.CLOCK_BOOTTIME) - seen_at
            log.debug("pid %d (%s) checked %.3f s after its first traced event: %s", rec.pid, rec.comm, lag,
                      verdict.reason)
        if not verdict.ok:
            self._reject(rec, verdict)
            return False
        rec.valid, rec.reason, rec.reason_code = True, verdict.reason, verdict.code
        rec.tgid = verdict.tgid or rec.tgid
        rec.create_time = verdict.create_time
        if self.threads and rec.tgid:
            self._add_threads(rec.tgid)
        return True

    def _add_threads(self, tgid: int) -> None:
        for t in self.validator.threads(tgid):  # type: ignore[union-attr]
            key = (t.pid, t.comm)
            rec = self.records.get(key)
            if rec is None or rec.exited or (rec.valid is False and self._replaced(rec)):
                verdict = self.validator.check(t.pid, t.comm, tgid)  # type: ignore[union-attr]
                if verdict.ok:
                    self._drop(key)
                    self.records[key] = ProcessRecord(
                        t.pid, tgid, t.comm, valid=True, create_time=verdict.create_time, from_threads=True
                    )

    # --- periodic ----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Note exits, re-check live records (a bounded number per call), pick up threads, publish the set.

        A record whose process exited is kept, marked ``exited``, if it was valid (so a short-lived sender
        stays in the report), and forgotten otherwise. Live records, rejected ones included, are checked
        again round-robin, at most RECHECKS_PER_REFRESH per call: a rejection can lift (the comm settled,
        the pid now belongs to an allowed process) and an accepted process can stop qualifying (it ran
        another program).
        """
        if self.validator is not None:
            live = []
            for key, rec in list(self.records.items()):
                if rec.exited:
                    continue
                if not self.validator.still_alive(rec.pid, rec.create_time):
                    if rec.valid:
                        self._mark_exited(key, rec)
                    else:
                        self._drop(key)
                    continue
                live.append((key, rec))
            if len(live) > RECHECKS_PER_REFRESH:
                start = next(self._recheck) * RECHECKS_PER_REFRESH % len(live)
                live = (live + live)[start:start + RECHECKS_PER_REFRESH]
            for key, rec in live:
                self._recheck_record(key, rec)
            if self.threads:
                for tgid in {r.tgid for r in self.records.values() if r.valid and not r.exited and r.tgid}:
                    self._add_threads(tgid)
        self.publish()
        self._report_metrics()

    def _recheck_record(self, key: tuple[int, str], rec: ProcessRecord) -> None:
        was_valid = rec.valid
        verdict = self.validator.check(rec.pid, rec.comm, rec.tgid)  # type: ignore[union-attr]
        if verdict.ok == bool(was_valid):
            return
        if verdict.ok:
            log.info("pid %d (%s) is now valid", rec.pid, rec.comm)
            self._rejected_keys.pop(key, None)
            rec.valid, rec.reason, rec.reason_code = True, verdict.reason, verdict.code
            rec.tgid, rec.create_time = verdict.tgid or rec.tgid, verdict.create_time
            if self.threads and rec.tgid:
                self._add_threads(rec.tgid)
        elif verdict.code in FORGET_AT_ONCE:
            self._mark_exited(key, rec)
        else:
            self._reject(rec, verdict)
            self._keep(key, rec)

    def _mark_exited(self, key: tuple[int, str], rec: ProcessRecord) -> None:
        rec.exited = True
        self._exited[key] = None
        while len(self._exited) > MAX_EXITED:
            self._drop(next(iter(self._exited)))
            self.exited_forgotten += 1

    def targets(self) -> frozenset[Target]:
        """Threads to favour: every valid (or, unvalidated, every seen) target subject still running."""
        return frozenset(
            Target(r.pid, r.tgid, r.comm) for r in self.records.values() if r.valid is not False and not r.exited
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
        valid = [r for r in self.records.values() if r.valid is not False and not r.exited]
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
            # Distinct subjects per reason (at most REJECTED_SUBJECTS_MAX each); a subject seen again after
            # it was forgotten (a dead pid in a paced replay) is checked again: "rejections" counts checks.
            doc["rejected"] = {code: len(keys) for code, keys in sorted(self.rejected_subjects.items())}
            doc["rejections"] = dict(sorted(self.rejected.items()))
        if self.exited_forgotten:
            doc["exited_forgotten"] = self.exited_forgotten
        if self.tracer is not None:
            doc["tracer"] = self.tracer
        if self.reader is not None:
            doc["reader"] = self.reader
        return doc

    def _validity(self, rec: ProcessRecord) -> dict:
        if self.validator is None:
            return {}
        return {"valid": rec.valid, "reason": rec.reason, "code": rec.reason_code or None,
                "from_threads": rec.from_threads, "exited": rec.exited}
