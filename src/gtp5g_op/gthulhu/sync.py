"""Desired-state reconciliation shared by every API generation: the background ``StrategyPusher``.

The pusher owns the timing (debounce, periodic re-send, faster retries during an outage, an outage
logged once, a bounded stop with a short-deadline final push). Each API generation supplies a
:class:`Backend` whose ``push(targets)`` reads what the server holds and writes what it should hold
for that set of targets, raising on failure: :class:`gtp5g_op.gthulhu.legacy.LegacyBackend` (PID
strategies, merged with everyone else's) and :class:`gtp5g_op.gthulhu.manager.ManagerBackend` (one
node scheduling policy per node). A new generation is one new backend.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from gtp5g_op.errors import OpError
from gtp5g_op.model import Target

log = logging.getLogger(__name__)

#: How long ``StrategyPusher.stop`` may take by default: a push in flight, then the final push.
STOP_TIMEOUT = 4.0


@dataclass
class PushOutcome:
    """What one successful push left on the server."""

    owned: int  # entries this tool holds there now (legacy: PID strategies; Manager: node policies)
    foreign_kept: int = 0  # others' entries a legacy merge re-posted
    summary: str = ""  # for the "back after" log line, e.g. "3 strategies"
    boosted: list[int] | None = None  # PIDs the node's Decision Maker boosts under our policies (None: not read)
    unvalidated: list[int] = field(default_factory=list)  # ... of which the watch did not validate


class Backend(Protocol):
    """What the pusher needs from an API generation."""

    kind: str
    api_url: str
    http: Any  # gtp5g_op.gthulhu.http.HttpClient: abort() and deadline_scope()

    @property
    def token_renewals(self) -> int: ...

    def push(self, targets: frozenset[Target]) -> PushOutcome: ...

    def close(self) -> None: ...


@dataclass
class PushStatus:
    """What the pusher did so far, for the live view, the JSON report and metrics."""

    running: bool = False
    api: str | None = None  # the API generation: legacy or manager
    desired: int = 0  # target threads
    owned: int = 0
    foreign_kept: int = 0
    pushes_ok: int = 0
    pushes_failed: int = 0
    token_renewals: int = 0
    last_push_time: float | None = None  # wall clock of the last successful push
    last_push_latency: float | None = None  # seconds the last successful push took
    last_change_latency: float | None = None  # seconds from a change of the set to the push that carried it
    last_ok: bool | None = None
    last_error: str | None = None
    outage_since: float | None = None  # wall clock; None while the API answers
    boosted: list[int] | None = None  # Decision Maker: PIDs boosted under gtp5g-op's policies
    boosted_unvalidated: list[int] = field(default_factory=list)  # ... that validation did not accept


class StrategyPusher:
    """Keep the server in step with the detected targets, from a background thread.

    ``update(targets)`` gives the full desired set; a change is pushed ``debounce`` seconds after
    the first change (later changes ride along, they do not delay it), and the whole set is re-sent
    every ``interval`` seconds so a restarted server is repopulated. After a failed push the next try
    comes sooner (0.5 s doubling, capped at ``interval``). Never raises into the caller; an outage is
    logged once when it starts and once when it ends. ``metrics`` (settable after construction) is
    told about every push, token renewal and Decision Maker reading.
    """

    def __init__(self, backend: Backend, interval: float = 10.0, debounce: float = 0.2, metrics: Any = None):
        self.backend = backend
        self.metrics = metrics  # gtp5g_op.ops.metrics.Metrics or None
        self.interval = interval
        self.debounce = debounce
        self._renewals_seen = 0
        self._cond = threading.Condition()
        self._targets: frozenset[Target] = frozenset()
        self._dirty_since: float | None = None
        self._next_push = 0.0
        self._failures = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._status = PushStatus(api=backend.kind)
        self._unvalidated_warned: frozenset[int] = frozenset()

    @property
    def client(self) -> Any:
        """The backend's API client."""
        return getattr(self.backend, "client", None)

    # --- caller side -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; the first push comes one debounce later (clearing stale entries of a previous run)."""
        with self._cond:
            self._next_push = time.monotonic() + self.debounce
            self._status.running = True
        self._thread = threading.Thread(target=self._run, name="strategy-pusher", daemon=True)
        self._thread.start()

    def update(self, targets: Iterable[Target]) -> None:
        """The full desired set of targets; cheap when nothing changed."""
        current = frozenset(targets)
        with self._cond:
            if current == self._targets:
                return
            self._targets = current
            self._status.desired = len({t.pid for t in current})
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
            self._cond.notify()

    def stop(self, final_push: bool, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop the thread, push once more if asked, and close the backend, all within about ``timeout`` s.

        A push in flight gets half of ``timeout``; then its calls are abandoned (their sockets shut
        down). The final push has the rest (at least 0.5 s) as one deadline for all of its calls,
        whatever the API does. Returns True if the last push succeeded.
        """
        started = time.monotonic()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout / 2)
            if self._thread.is_alive():
                log.info("abandoning the push to %s that is still in flight", self.backend.api_url)
                self.backend.http.abort()
                self._thread.join(1.0)
            if self._thread.is_alive():
                log.warning("a push to %s is still in flight; not waiting for it", self.backend.api_url)
                self._status.running = False
                return False
        ok = bool(self._status.last_ok)
        if final_push:
            with self._cond:
                targets, changed_at = self._targets, self._dirty_since
                self._dirty_since = None
            with self.backend.http.deadline_scope(max(0.5, timeout - (time.monotonic() - started))):
                ok = self._push(targets, changed_at)
            if not ok:
                log.warning("the final push to %s failed: %s", self.backend.api_url, self._status.last_error)
        with self.backend.http.deadline_scope(max(0.2, min(1.0, timeout - (time.monotonic() - started)))):
            try:
                self.backend.close()
            except Exception:  # noqa: BLE001 - closing (a logout) must not fail the stop
                log.debug("closing the API client failed", exc_info=True)
        self._status.running = False
        return ok

    @property
    def status(self) -> PushStatus:
        """A snapshot of the counters."""
        with self._cond:
            return replace(self._status, token_renewals=self.backend.token_renewals)

    # --- thread side ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    due = self._next_push
                    if self._dirty_since is not None:
                        due = min(due, self._dirty_since + self.debounce)
                    wait = due - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopping:
                    return
                targets, changed_at = self._targets, self._dirty_since
                self._dirty_since = None
            ok = self._push(targets, changed_at)
            with self._cond:
                if ok:
                    self._failures = 0
                    delay = self.interval
                else:
                    self._failures += 1
                    delay = min(self.interval, 0.5 * 2 ** (self._failures - 1)) * random.uniform(0.9, 1.1)
                self._next_push = time.monotonic() + delay

    def _push(self, targets: frozenset[Target], changed_at: float | None) -> bool:
        """One push, reported to ``metrics``; never raises."""
        started = time.monotonic()
        try:
            outcome = self.backend.push(targets)
        except Exception as exc:  # noqa: BLE001 - the watch must survive anything the API does
            self._failed(exc, len({t.pid for t in targets}))
            outcome = None
        done = time.monotonic()
        if outcome is not None:
            self._succeeded(outcome, started, done, changed_at)
        if self.metrics is not None:
            try:
                self.metrics.observe_push(outcome is not None, done - started)
                renewals = self.backend.token_renewals
                for _ in range(renewals - self._renewals_seen):
                    self.metrics.token_renewed()
                self._renewals_seen = renewals
                if outcome is not None and outcome.boosted is not None:
                    self.metrics.observe_boosted(len(outcome.boosted) - len(outcome.unvalidated), len(outcome.unvalidated))
            except Exception:  # metrics must never stop pushing
                log.debug("metrics update failed", exc_info=True)
        return outcome is not None

    def _succeeded(self, outcome: PushOutcome, started: float, done: float, changed_at: float | None) -> None:
        with self._cond:
            st = self._status
            if st.outage_since is not None:
                log.warning(
                    "Gthulhu API at %s is back after %.0f s; pushed %s",
                    self.backend.api_url, time.time() - st.outage_since, outcome.summary,
                )
            st.pushes_ok += 1
            st.api = self.backend.kind  # an auto-detecting backend knows it from its first push on
            st.last_ok, st.last_error, st.outage_since = True, None, None
            st.last_push_time = time.time()
            st.last_push_latency = done - started
            if changed_at is not None:
                st.last_change_latency = done - changed_at
            st.owned, st.foreign_kept = outcome.owned, outcome.foreign_kept
            if outcome.boosted is not None:
                st.boosted, st.boosted_unvalidated = sorted(outcome.boosted), sorted(outcome.unvalidated)
        log.debug("pushed %s in %.3f s", outcome.summary, done - started)
        unvalidated = frozenset(outcome.unvalidated)
        if unvalidated and unvalidated != self._unvalidated_warned:
            log.warning(
                "the Decision Maker boosts PID %s under gtp5g-op's policy although validation did not accept "
                "them: Gthulhu v1.x boosts every process with a matching comm (see docs/api.md)",
                ", ".join(map(str, sorted(unvalidated)[:20])),
            )
        self._unvalidated_warned = unvalidated

    def _failed(self, exc: Exception, n_desired: int) -> None:
        message = exc.one_line() if isinstance(exc, OpError) else f"{type(exc).__name__}: {exc}"
        with self._cond:
            st = self._status
            st.pushes_failed += 1
            st.last_ok, st.last_error = False, message
            first = st.outage_since is None
            if first:
                st.outage_since = time.time()
            stopping = self._stopping
        if first and not stopping:
            log.warning(
                "cannot push strategies to %s: %s; keeping all %d targets and pushing when it is back",
                self.backend.api_url, message, n_desired,
                exc_info=not isinstance(exc, (OpError, OSError)),
            )
        else:
            log.debug("push failed: %s", message)
