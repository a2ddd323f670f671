"""The legacy Gthulhu API (Gthulhu/api up to v0.1.0): PID strategies, a token from the server's public key.

- :class:`GthulhuClient`: token from the public key, RS256 check, renewal, strategies CRUD, over the
  hardened :class:`~gtp5g_op.gthulhu.http.HttpClient`. The token lives only in this object's memory
  (a :class:`~gtp5g_op.gthulhu.http.Secret`): never logged, never in an exception, a ``repr`` or on disk.
- Reconciliation: a POST replaces the server's whole set, so every push reads the set first and keeps
  every entry this tool did not create (:func:`merge`). The tool's own entries are plain
  ``{"priority", "execution_time", "pid"}`` objects; the server drops unknown fields, so a marker inside
  an entry would not survive. The PIDs this tool pushed are kept in memory and in the ownership file
  (:class:`~gtp5g_op.gthulhu.ownership.OwnershipStore`), so a restarted watch still removes the entries
  of processes that died while it was down. Entries that carry ``selectors`` are the server's per-PID
  expansion of someone's selector strategy: they are re-posted once as that selector strategy.
- :class:`LegacyBackend`: what the generation-neutral :class:`~gtp5g_op.gthulhu.sync.StrategyPusher`
  calls to make the server hold the desired set.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import jwt
import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gtp5g_op.config import DEFAULT_KNOWN_SELECTORS, Policy, format_duration_ns
from gtp5g_op.errors import ApiError, OpError, UsageError
from gtp5g_op.gthulhu.http import DEFAULT_DEADLINE, DEFAULT_MAX_BODY, HttpClient, Reply
from gtp5g_op.gthulhu.secret import Secret
from gtp5g_op.gthulhu.ownership import WATCH, OwnershipStore
from gtp5g_op.gthulhu.sync import PushOutcome
from gtp5g_op.model import Target
from gtp5g_op.ops.statedir import StateDirError

log = logging.getLogger(__name__)

TOKEN_PATH = "/api/v1/auth/token"
STRATEGIES_PATH = "/api/v1/scheduling/strategies"
PODS_PATH = "/api/v1/pods/pids"
#: An issued token whose ``exp`` is further in the past than this (seconds, by this host's clock) is refused.
CLOCK_SKEW = 120.0
_MAX_PID = 2**32
_MAX_NS = 2**64


def load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    """The RSA public key in ``pem``; a UsageError saying what is wrong otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise UsageError(
            "the public key file is not a PEM public key",
            "give the Gthulhu server's public key (-----BEGIN PUBLIC KEY-----), e.g. from its jwt secret",
        ) from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise UsageError("the public key is not an RSA key", "Gthulhu signs tokens with RS256: give its RSA public key")
    return key


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class GthulhuClient:
    """Authenticated access to one legacy Gthulhu API server (or a v1.x Decision Maker, read-only).

    ``timeout`` is the ``(connect, read)`` limit of each socket operation, ``deadline`` the limit of a
    whole call (retries included), ``retries`` how many times a call is tried again after a connection
    error, a read timeout or a 429/5xx answer. POST is retried too: it replaces the whole set, so
    sending it twice is harmless. TLS is verified unless ``insecure``; ``ca_bundle`` adds a CA file.
    """

    kind = "legacy"

    def __init__(
        self,
        api_url: str,
        public_key_pem: bytes,
        ca_bundle: str | None = None,
        insecure: bool = False,
        timeout: tuple[float, float] = (3.05, 5),
        retries: int = 2,
        backoff_factor: float = 0.2,
        backoff_jitter: float = 0.1,
        renew_margin: float = 60.0,
        deadline: float = DEFAULT_DEADLINE,
        max_body: int = DEFAULT_MAX_BODY,
        clock_skew: float = CLOCK_SKEW,
    ):
        self._pem = public_key_pem
        self._key = load_public_key(public_key_pem)
        self.http = HttpClient(
            api_url, ca_bundle=ca_bundle, insecure=insecure, timeout=timeout, deadline=deadline, retries=retries,
            backoff_factor=backoff_factor, backoff_jitter=backoff_jitter, max_body=max_body,
        )
        self.api_url = self.http.base_url
        self.renew_margin = renew_margin
        self.clock_skew = clock_skew
        self.token_renewals = 0
        self._token: Secret | None = None
        self._renew_at = 0.0  # time.monotonic() after which the token is renewed
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "token held" if self._token else "no token"
        return f"GthulhuClient({self.api_url!r}, {state})"

    def close(self) -> None:
        """Drop the connection pool and forget the token."""
        self.http.close()
        self._token = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- answers -------------------------------------------------------------------------------

    def _json(self, reply: Reply, fix_401: str = "check --public-key: it must be this server's key") -> dict:
        if reply.status >= 400:
            if reply.status == 401:
                fix = fix_401
            elif reply.status in (404, 405) and reply.url.endswith((TOKEN_PATH, STRATEGIES_PATH)):
                fix = ("this server has no legacy strategies API: for a Gthulhu v1.x Manager use --api manager "
                       "(or --api auto)")
            else:
                fix = "check the Gthulhu API server's log"
            raise self.http.error(reply, fix)
        doc = reply.json()
        if not isinstance(doc, dict):
            raise ApiError(
                f"{reply.method} {reply.url}: HTTP {reply.status} but the body is not a JSON object: "
                f"{self.http.redactor.clean(reply.text())!r}",
                "is --api-url pointing at the Gthulhu API server?",
            )
        if doc.get("success") is False:
            raise self.http.error(reply, "check the server's log", f"server says: {_message(doc, self.http)}")
        return doc

    # --- token ---------------------------------------------------------------------------------

    def _fetch_token(self) -> None:
        """Ask for a token with the public key, verify its RS256 signature and expiry, remember when to renew."""
        url = self.http.url(TOKEN_PATH)
        body = {"public_key": self._pem.decode("ascii", "replace"), "client_id": "gtp5g-op"}
        reply = self.http.request("POST", TOKEN_PATH, body=body)
        if reply.status >= 400:
            self._json(reply, "give the public key of the server at --api-url (--public-key / GTP5G_OP_PUBLIC_KEY)")
        doc = reply.json()
        # A 2xx body may hold a token in a shape we do not know: never quote it.
        if not isinstance(doc, dict) or doc.get("success") is False:
            raise ApiError(f"POST {url}: HTTP {reply.status} but not a token answer", "is --api-url a Gthulhu API server?")
        data = doc.get("data") if isinstance(doc.get("data"), dict) else {}
        token = doc.get("token") or data.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError(f"POST {url}: the answer carries no token", "is this a Gthulhu API server?")
        self.http.redactor.add(token)
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["RS256"],
                options={"require": ["exp"], "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except (jwt.InvalidTokenError, ValueError, TypeError, OverflowError) as exc:
            raise ApiError(
                f"POST {url}: the token is not a valid RS256 JWT signed by the given public key ({type(exc).__name__})",
                "give the public key of the server at --api-url",
            ) from None
        exp, iat, now = claims.get("exp"), claims.get("iat"), time.time()
        if not _number(exp):
            raise ApiError(f"POST {url}: the token's exp claim is not a number", "check the Gthulhu API server's version")
        if exp + self.clock_skew < now:
            raise ApiError(
                f"POST {url}: the server issued a token that expired {now - exp:.0f} s ago "
                f"(beyond the {self.clock_skew:g} s clock-skew allowance)",
                "check the clocks of this host and of the API server (NTP)",
            )
        # The lifetime comes from the token's own iat/exp and is anchored to our monotonic clock, so a
        # skewed host clock does not make a fresh token look expired; but never past exp + allowance.
        # Both are whole seconds: the token may be up to 1 s older than iat says, hence the - 1.
        lifetime = exp - iat if _number(iat) and iat <= exp else exp - now
        lifetime = max(0.0, min(float(lifetime), exp - now + self.clock_skew) - 1.0)
        margin = min(self.renew_margin, lifetime * 0.2)
        self._token = Secret(token)
        self._renew_at = time.monotonic() + lifetime - margin
        self.token_renewals += 1
        log.debug("got a token from %s valid for %.0f s (renewing %.1f s early)", url, lifetime, margin)

    def _current_token(self, force: bool = False) -> Secret:
        with self._lock:
            if force or self._token is None or time.monotonic() >= self._renew_at:
                self._token = None
                self._fetch_token()
            assert self._token is not None
            return self._token

    @property
    def token_valid_for(self) -> float | None:
        """Seconds until the token is renewed, or None without a token (for status displays)."""
        return None if self._token is None else max(0.0, self._renew_at - time.monotonic())

    def _call(self, method: str, path: str, body: Any = None) -> dict:
        """An authenticated call; on 401 renew the token once and retry."""
        reply = self.http.request(method, path, body=body, token=self._current_token())
        if reply.status == 401:
            log.debug("%s %s answered 401; renewing the token once", method, path)
            reply = self.http.request(method, path, body=body, token=self._current_token(force=True))
        return self._json(reply)

    # --- API -----------------------------------------------------------------------------------

    def health(self) -> dict:
        """``GET /health`` (no token needed)."""
        return self._json(self.http.request("GET", "/health"))

    def authenticate(self) -> None:
        """Get a fresh token now (useful to check the key before a long run)."""
        self._current_token(force=True)

    def list_strategies(self) -> list[dict]:
        """The server's resolved strategies (selector strategies expanded into per-PID entries), checked."""
        doc = self._call("GET", STRATEGIES_PATH)
        items = doc.get("scheduling")
        if items is None:
            return []
        if not isinstance(items, list):
            raise self._shape("'scheduling' is not a list")
        for n, item in enumerate(items):
            problem = _strategy_problem(item)
            if problem:
                raise self._shape(f"strategy {n}: {problem}")
        return items

    def _shape(self, what: str) -> ApiError:
        return ApiError(f"GET {self.http.url(STRATEGIES_PATH)}: {what}", "check that --api-url is a Gthulhu API server")

    def post_strategies(self, strategies: list[dict]) -> None:
        """Replace the server's whole strategy set with ``strategies``."""
        self._call("POST", STRATEGIES_PATH, {"strategies": strategies})

    def pods_pids(self) -> list[dict]:
        """``GET /api/v1/pods/pids``: pods with their processes (``pod_name``, ``processes`` ...)."""
        pods = self._call("GET", PODS_PATH).get("pods") or []
        if not isinstance(pods, list):
            raise ApiError(f"GET {self.http.url(PODS_PATH)}: 'pods' is not a list", "check the server version")
        return pods


def _message(doc: dict, http: HttpClient) -> str:
    for key in ("error", "message"):
        if isinstance(doc.get(key), str) and doc[key].strip():
            return http.redactor.clean(doc[key])
    return "(no message)"


def _strategy_problem(item: Any) -> str | None:
    """Why a GET entry is not a strategy this tool can handle (None when it is)."""
    if not isinstance(item, dict):
        return "not an object"
    pid = item.get("pid", 0)
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < _MAX_PID:
        return "'pid' is not a PID"
    if not isinstance(item.get("priority", False), (bool, int)):
        return "'priority' is neither a boolean nor an integer"
    exe = item.get("execution_time", 0)
    if not isinstance(exe, int) or isinstance(exe, bool) or not 0 <= exe < _MAX_NS:
        return "'execution_time' is not a number of nanoseconds"
    selectors = item.get("selectors") or []
    if not isinstance(selectors, list) or not all(
        isinstance(s, dict) and isinstance(s.get("key", ""), str) and isinstance(s.get("value", ""), str) for s in selectors
    ):
        return "'selectors' is not a list of {key, value} strings"
    if not isinstance(item.get("command_regex", ""), (str, type(None))):
        return "'command_regex' is not a string"
    return None


# --- strategies from targets ------------------------------------------------------------------------


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


def _covering_selectors(server: Sequence[dict], pids: Iterable[int]) -> dict[int, str]:
    """PID → the selector strategy (as text) that already covers it on the server."""
    wanted = set(pids)
    return {
        e["pid"]: f"{selectors_text(e['selectors'])} (priority {str(e.get('priority')).lower()}, "
        f"{format_duration_ns(e.get('execution_time') or 0)})"
        for e in server
        if e.get("selectors") and e.get("pid") in wanted
    }


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
    """Add (or update) strategies for ``pids``, keeping everything else on the server unless ``replace_all``.

    A PID that a selector strategy already covers is refused: a PID entry beside it would be a second,
    conflicting strategy for the same thread.
    """
    desired = [strategy_for(p, priority, execution_time_ns) for p in sorted(set(pids))]
    if replace_all:
        result = MergeResult(body=desired)
    else:
        server = client.list_strategies()
        covered = _covering_selectors(server, pids)
        if covered:
            first = min(covered)
            raise OpError(
                f"PID {', '.join(map(str, sorted(covered)))} is already covered by the selector strategy "
                f"{covered[first]} on {client.api_url}; a PID strategy beside it would conflict",
                "change that selector strategy instead, or leave the PID out",
            )
        result = merge(server, desired, set(), known_selectors)
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


@dataclass
class PruneResult:
    """What ``prune`` found and did."""

    removed: list[int]
    recorded: list[int]  # PIDs the ownership file held
    server_pid_strategies: int  # PID strategies (not selector expansions) the server held
    ownership_file: str


def prune(client: GthulhuClient, store: OwnershipStore, known_selectors: Sequence[dict] = DEFAULT_KNOWN_SELECTORS) -> PruneResult:
    """Remove only the strategies this tool put there (watch and manual); always asks the server."""
    owned = store.owned()
    server = client.list_strategies()
    pid_entries = {e.get("pid") for e in server if not e.get("selectors") and e.get("pid")}
    removed = sorted(owned & pid_entries)
    if removed:
        client.post_strategies(merge(server, [], owned, known_selectors).body)
    if owned:
        store.change(set_watch=(), remove=owned)
    return PruneResult(removed, sorted(owned), len(pid_entries), str(store.path))


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
            except (psutil.Error, ValueError, OverflowError):
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


# --- the pusher's backend -------------------------------------------------------------------------


class LegacyBackend:
    """Makes a legacy server hold the desired PID strategies: GET, merge, POST (or POST only with ``replace``)."""

    kind = "legacy"

    def __init__(
        self,
        client: GthulhuClient,
        policy: Policy,
        store: OwnershipStore | None = None,
        replace: bool = False,
        known_selectors: Sequence[dict] = DEFAULT_KNOWN_SELECTORS,
    ):
        self.client = client
        self.http = client.http
        self.api_url = client.api_url
        self.policy = policy
        self.replace = replace
        self.known_selectors = tuple(known_selectors)
        self.store = store if store is not None else OwnershipStore(client.api_url)
        self._owned: set[int] = set()
        self._store_warned = False
        self._regex_warned: set[str] = set()
        try:
            self._owned = self.store.owned(WATCH)
        except StateDirError as exc:
            self._store_problem(exc)

    @property
    def token_renewals(self) -> int:
        return self.client.token_renewals

    def push(self, targets: frozenset[Target]) -> PushOutcome:
        """One GET + merge + POST (a plain POST with ``replace``); raises on failure."""
        desired = target_strategies(targets, self.policy)
        desired_pids = {d["pid"] for d in desired}
        try:
            if self.replace:
                result = MergeResult(body=desired)
            else:
                result = merge(self.client.list_strategies(), desired, self._owned, self.known_selectors)
                self._warn_regex_lost(result.regex_lost)
            self.client.post_strategies(result.body)
        except BaseException:
            # We may or may not have replaced the set: keep claiming both old and new PIDs.
            self._owned |= desired_pids
            self._save_owned()
            raise
        self._owned = desired_pids
        self._save_owned()
        return PushOutcome(owned=len(desired_pids), foreign_kept=len(result.body) - len(desired),
                           summary=f"{len(desired)} strateg{'y' if len(desired) == 1 else 'ies'}")

    def close(self) -> None:
        self.client.close()

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
