"""Detected targets → Gthulhu strategies, ownership and merge, and the background ``StrategyPusher``.

Ownership (details in docs/api.md): a POST replaces the server's whole set, so before each push the
pusher reads the server's set and keeps every entry this tool did not create. The tool's own entries
are plain ``{"priority", "execution_time", "pid"}`` objects; the server drops unknown fields, so a
marker inside the entry would not survive. Instead the PIDs this tool pushed are kept in memory and in
a small JSON state file (``OwnershipStore``, no secrets), so a restarted watch still recognises and
removes the entries of processes that died while it was down. Entries that carry ``selectors`` are
the server's per-PID expansion of someone's selector strategy: they are re-posted once as that
selector strategy (without ``pid``), never as PID entries.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import psutil

from gtp5g_op.config import DEFAULT_KNOWN_SELECTORS, Policy, Settings, format_duration_ns
from gtp5g_op.errors import OpError
from gtp5g_op.gthulhu.legacy import GthulhuClient
from gtp5g_op.gthulhu.ownership import WATCH, OwnershipStore
from gtp5g_op.model import Target
from gtp5g_op.ops.statedir import StateDirError

log = logging.getLogger(__name__)



def strategy_for(pid: int, priority: bool, execution_time_ns: int) -> dict:
    """The strategy object for one thread, as the lab deployment posted it."""
    return {"priority": priority, "execution_time": execution_time_ns, "pid": pid}


def target_strategies(targets: Iterable[Target], policy: Policy) -> list[dict]:
    """One strategy per distinct target PID, sorted by PID, parameters from ``policy``."""
    by_pid: dict[int, Target] = {}
    for target in targets:
        by_pid.setdefault(target.pid, target)
    return [strategy_for(pid, *policy.resolve(by_pid[pid].comm)) for pid in sorted(by_pid)]


# --- merge ----------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    """The body to POST and what it kept of the server's set."""

    body: list[dict]
    foreign_pids: list[int] = field(default_factory=list)
    selector_strategies: int = 0
    regex_lost: list[str] = field(default_factory=list)  # selector strategies whose command_regex is unknown


def _selectors_key(selectors: Sequence[dict]) -> tuple:
    return tuple(sorted((str(s.get("key")), str(s.get("value"))) for s in selectors))


def selectors_text(selectors: Sequence[dict] | None) -> str:
    """``app=ueransim-macvlan,tier=ran`` for display."""
    return ",".join(f"{k}={v}" for k, v in _selectors_key(selectors or ()))


def merge(
    server: Sequence[dict],
    desired: Sequence[dict],
    owned: set[int],
    known_selectors: Sequence[dict] = DEFAULT_KNOWN_SELECTORS,
) -> MergeResult:
    """The set to POST: ``desired`` plus every server entry this tool does not own.

    - entries with ``selectors`` are collapsed into one selector strategy per (selectors, priority,
      execution_time), without ``pid``; GET drops ``command_regex``, so it is taken from
      ``known_selectors`` when the selectors match one there (else listed in ``regex_lost``);
    - PID entries whose PID is in ``owned`` or in ``desired`` are dropped (ours, or replaced by ours);
    - other PID entries are kept as they are (de-duplicated).
    """
    desired_pids = {d["pid"] for d in desired if "pid" in d}
    known = {_selectors_key(k["selectors"]): k for k in known_selectors}
    selector_out: dict[tuple, dict] = {}
    foreign: dict[str, dict] = {}
    result = MergeResult(body=[])
    for entry in server:
        selectors = entry.get("selectors")
        if selectors:
            skey = _selectors_key(selectors)
            key = (skey, entry.get("priority"), entry.get("execution_time"))
            if key in selector_out:
                continue
            strategy = {k: copy.deepcopy(entry[k]) for k in ("priority", "execution_time", "selectors") if k in entry}
            regex = entry.get("command_regex") or known.get(skey, {}).get("command_regex")
            if regex:
                strategy["command_regex"] = regex
            elif skey not in known:
                result.regex_lost.append(selectors_text(selectors))
            selector_out[key] = strategy
            continue
        pid = entry.get("pid")
        if not pid or pid in owned or pid in desired_pids:
            continue
        foreign.setdefault(json.dumps(entry, sort_keys=True), dict(entry))
    result.selector_strategies = len(selector_out)
    result.foreign_pids = sorted({e["pid"] for e in foreign.values()})
    result.body = list(selector_out.values()) + list(foreign.values()) + [dict(d) for d in desired]
    return result


# --- one-shot operations for the CLI ---------------------------------------------------------------


def push_pids(
    client: GthulhuClient,
    pids: Sequence[int],
    priority: bool,
    execution_time_ns: int,
    store: OwnershipStore,
    replace_all: bool = False,
    known_selectors: Sequence[dict] = DEFAULT_KNOWN_SELECTORS,
) -> MergeResult:
    """Add (or update) strategies for ``pids``, keeping everything else on the server unless ``replace_all``."""
    desired = [strategy_for(p, priority, execution_time_ns) for p in sorted(set(pids))]
    result = MergeResult(body=desired) if replace_all else merge(client.list_strategies(), desired, set(), known_selectors)
    client.post_strategies(result.body)
    if replace_all:
        store.change(set_watch=(), remove=store.owned())
    store.change(add_manual=pids)
    return result


def delete_pids(
    client: GthulhuClient, pids: Sequence[int], store: OwnershipStore, known_selectors: Sequence[dict] = DEFAULT_KNOWN_SELECTORS
) -> list[int]:
    """Remove the PID strategies for ``pids`` (whoever posted them); returns the PIDs removed."""
    server = client.list_strategies()
    present = {e.get("pid") for e in server if not e.get("selectors")}
    removed = sorted(set(pids) & present)
    from_selectors = sorted({e["pid"] for e in server if e.get("selectors") and e.get("pid") in set(pids)} - set(removed))
    if not removed:
        extra = (
            f"; {', '.join(map(str, from_selectors))} is matched by a selector strategy: change that strategy instead"
            if from_selectors
            else ""
        )
        raise OpError(f"no PID strategy for {', '.join(map(str, pids))} on {client.api_url}{extra}", "see `gtp5g-op strategies list`")
    client.post_strategies(merge(server, [], set(removed), known_selectors).body)
    store.change(remove=removed)
    return removed


def prune(client: GthulhuClient, store: OwnershipStore, known_selectors: Sequence[dict] = DEFAULT_KNOWN_SELECTORS) -> list[int]:
    """Remove only the strategies this tool put there (watch and manual); returns the PIDs removed."""
    owned = store.owned()
    if not owned:
        return []
    server = client.list_strategies()
    removed = sorted(owned & {e.get("pid") for e in server if not e.get("selectors")})
    client.post_strategies(merge(server, [], owned, known_selectors).body)
    store.change(set_watch=(), remove=owned)
    return removed


def describe(entries: Sequence[dict], owners: dict[int, str]) -> list[dict]:
    """Rows for ``strategies list``: the entry plus comm/state of that PID on this host and who owns it."""
    rows = []
    for entry in entries:
        pid = entry.get("pid")
        comm = state = None
        if isinstance(pid, int) and pid > 0:
            try:
                proc = psutil.Process(pid)
                comm, state = proc.name(), proc.status()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        exe = entry.get("execution_time")
        rows.append(
            {
                "pid": pid,
                "comm": comm,
                "state": state,
                "priority": entry.get("priority"),
                "execution_time": exe,
                "execution_time_human": format_duration_ns(exe) if isinstance(exe, int) else None,
                "selectors": selectors_text(entry.get("selectors")),
                "command_regex": entry.get("command_regex") or "",
                "owner": "selector" if entry.get("selectors") else owners.get(pid, "foreign"),
            }
        )
    return rows


# --- the background pusher --------------------------------------------------------------------------


@dataclass
class PushStatus:
    """What the pusher did so far, for the live view and metrics."""

    running: bool = False
    desired: int = 0
    owned: int = 0
    foreign_kept: int = 0
    pushes_ok: int = 0
    pushes_failed: int = 0
    token_renewals: int = 0
    last_push_time: float | None = None  # wall clock of the last successful push
    last_push_latency: float | None = None  # seconds the last successful push took (GET + POST)
    last_change_latency: float | None = None  # seconds from a change of the set to the push that carried it
    last_ok: bool | None = None
    last_error: str | None = None
    outage_since: float | None = None  # wall clock; None while the API answers


class StrategyPusher:
    """Keep the server's set in step with the detected targets, from a background thread.

    ``update(targets)`` gives the full desired set; a change is pushed ``debounce`` seconds after
    the first change (later changes ride along, they do not delay it), and the whole set is re-sent
    every ``interval`` seconds so a restarted server is repopulated. After a failed push the next try
    comes sooner (0.5 s doubling, capped at ``interval``). Never raises into the caller; an outage is
    logged once when it starts and once when it ends. ``metrics`` (settable after construction) is
    told about every push and token renewal.
    """

    def __init__(
        self,
        client: GthulhuClient,
        policy: Policy,
        interval: float = 10.0,
        debounce: float = 0.2,
        replace: bool = False,
        store: OwnershipStore | None = None,
        known_selectors: Sequence[dict] = DEFAULT_KNOWN_SELECTORS,
        metrics: Any = None,
    ):
        self.client = client
        self.metrics = metrics  # gtp5g_op.ops.metrics.Metrics (observe_push, token_renewed) or None
        self._renewals_seen = 0
        self.policy = policy
        self.interval = interval
        self.debounce = debounce
        self.replace = replace
        self.known_selectors = tuple(known_selectors)
        self.store = store if store is not None else OwnershipStore(client.api_url)
        self._cond = threading.Condition()
        self._desired: list[dict] = []
        self._dirty_since: float | None = None
        self._next_push = 0.0
        self._failures = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._owned: set[int] = set()
        self._status = PushStatus()
        self._store_warned = False
        self._regex_warned: set[str] = set()
        try:
            self._owned = self.store.owned(WATCH)
        except StateDirError as exc:
            self._store_problem(exc)

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
        desired = target_strategies(targets, self.policy)
        with self._cond:
            if desired == self._desired:
                return
            self._desired = desired
            self._status.desired = len(desired)
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
            self._cond.notify()

    def stop(self, final_push: bool, timeout: float | None = None) -> bool:
        """Stop the thread (waiting up to ``timeout`` for a push in flight), then push once more if asked.

        Returns True if the last push succeeded.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("a strategy push to %s is still in flight; not waiting for it", self.client.api_url)
                return False
        with self._cond:
            desired, changed_at = list(self._desired), self._dirty_since
            self._dirty_since = None
        ok = self._push(desired, changed_at) if final_push else bool(self._status.last_ok)
        self._status.running = False
        return ok

    @property
    def status(self) -> PushStatus:
        """A snapshot of the counters."""
        with self._cond:
            return replace(self._status, token_renewals=self.client.token_renewals)

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
                desired, changed_at = list(self._desired), self._dirty_since
                self._dirty_since = None
            ok = self._push(desired, changed_at)
            with self._cond:
                if ok:
                    self._failures = 0
                    delay = self.interval
                else:
                    self._failures += 1
                    delay = min(self.interval, 0.5 * 2 ** (self._failures - 1)) * random.uniform(0.9, 1.1)
                self._next_push = time.monotonic() + delay

    def _push(self, desired: list[dict], changed_at: float | None) -> bool:
        """One push, reported to ``metrics``; never raises."""
        started = time.monotonic()
        ok = self._push_once(desired, changed_at)
        if self.metrics is not None:
            try:
                self.metrics.observe_push(ok, time.monotonic() - started)
                for _ in range(self.client.token_renewals - self._renewals_seen):
                    self.metrics.token_renewed()
                self._renewals_seen = self.client.token_renewals
            except Exception:  # metrics must never stop pushing
                log.debug("metrics update failed", exc_info=True)
        return ok

    def _push_once(self, desired: list[dict], changed_at: float | None) -> bool:
        """One GET + merge + POST (or a plain POST with ``replace``); never raises."""
        started = time.monotonic()
        desired_pids = {d["pid"] for d in desired}
        try:
            if self.replace:
                result = MergeResult(body=desired)
            else:
                result = merge(self.client.list_strategies(), desired, self._owned, self.known_selectors)
                self._warn_regex_lost(result.regex_lost)
            self.client.post_strategies(result.body)
        except Exception as exc:  # noqa: BLE001 - the watch must survive anything the API does
            # We may or may not have replaced the set: keep claiming both old and new PIDs.
            self._owned |= desired_pids
            self._save_owned()
            self._failed(exc, len(desired))
            return False
        done = time.monotonic()
        self._owned = desired_pids
        self._save_owned()
        with self._cond:
            st = self._status
            if st.outage_since is not None:
                log.warning(
                    "Gthulhu API at %s is back after %.0f s; pushed %d strategies",
                    self.client.api_url, time.time() - st.outage_since, len(desired),
                )
            st.pushes_ok += 1
            st.last_ok, st.last_error, st.outage_since = True, None, None
            st.last_push_time = time.time()
            st.last_push_latency = done - started
            if changed_at is not None:
                st.last_change_latency = done - changed_at
            st.owned, st.foreign_kept = len(desired_pids), len(result.body) - len(desired)
        log.debug("pushed %d strategies (%d ours) in %.3f s", len(result.body), len(desired), done - started)
        return True

    def _failed(self, exc: Exception, n_desired: int) -> None:
        message = exc.one_line() if isinstance(exc, OpError) else f"{type(exc).__name__}: {exc}"
        with self._cond:
            st = self._status
            st.pushes_failed += 1
            st.last_ok, st.last_error = False, message
            first = st.outage_since is None
            if first:
                st.outage_since = time.time()
        if first:
            log.warning(
                "cannot push strategies to %s: %s; keeping all %d targets and pushing when it is back",
                self.client.api_url, message, n_desired,
                exc_info=not isinstance(exc, (OpError, OSError)),
            )
        else:
            log.debug("push still failing: %s", message)

    def _save_owned(self) -> None:
        try:
            self.store.change(set_watch=self._owned)
        except StateDirError as exc:
            self._store_problem(exc)

    def _store_problem(self, exc: StateDirError) -> None:
        if not self._store_warned:
            self._store_warned = True
            log.warning("cannot use the ownership file %s (%s): owned PIDs are kept in memory only",
                        self.store.path, exc.one_line())

    def _warn_regex_lost(self, names: list[str]) -> None:
        for name in names:
            if name not in self._regex_warned:
                self._regex_warned.add(name)
                log.warning(
                    "selector strategy %s came back from the API without its command_regex; it is re-posted "
                    "without one, which widens it to every process of those pods; add it to "
                    "[[push.known_selectors]] in the config file to keep the regex",
                    name,
                )


def make_client(settings: Settings, retries: int = 2) -> GthulhuClient:
    """A client from ``config.Settings`` (public key read from its file)."""
    return GthulhuClient(
        settings.api_url,
        settings.public_key_pem(),
        ca_bundle=settings.ca_bundle_path(),
        insecure=settings.insecure,
        timeout=(min(3.05, settings.timeout), settings.timeout),
        retries=retries,
    )


def make_pusher(settings: Settings, client: GthulhuClient | None = None) -> StrategyPusher:
    """A pusher configured from ``config.Settings`` (interval, debounce, replace, state dir, known selectors)."""
    client = client or make_client(settings)
    return StrategyPusher(
        client,
        settings.policy,
        interval=settings.interval,
        debounce=settings.debounce,
        replace=settings.replace,
        store=OwnershipStore(settings.api_url, settings.state_dir),
        known_selectors=settings.known_selectors,
    )

