"""The Gthulhu v1.x Manager (v1.3.0 and later): user login and node scheduling policies, which boost by comm.

Gthulhu v1.x takes no PIDs from clients: the Decision Maker on each node boosts every process whose
comm matches a policy's ``commandRegex``. So gtp5g-op pushes, per node, **one node scheduling policy**
(per distinct priority and time slice, normally one) whose regex matches exactly the comms of the
validated targets on that node::

    {"nodeNames": ["upf-1"], "commandRegex": "^(?P<gtp5g_op>)(?:nr-gnb|nr-ue)$",
     "priority": 10, "executionTime": 20000000}

It is created when the first target appears, updated in place (PUT with its id, learnt from
``/self`` since the POST answers none) when the set of comms changes, and deleted when no target is
left.

**Ownership.** ``GET /api/v1/node-scheduling-policies/self`` lists only the calling user's policies,
so other users' policies are never even seen. Among the user's own, gtp5g-op's carry an empty named
group at the start of the regex, ``(?P<gtp5g_op>)`` for a watch and ``(?P<gtp5g_op_manual>)`` for
``strategies push``: it matches the empty string, so it changes nothing about what the regex matches
(RE2 and Python agree), and it tells gtp5g-op's policies apart from those the same user made by hand,
which are never touched. A watch only touches the policies whose ``nodeNames`` is exactly its node.

The access token (one minute in v1.3.0) is renewed with the refresh token before it lapses, and once
on a 401; when refreshing fails the client logs in again. Password and tokens are
:class:`~gtp5g_op.gthulhu.secret.Secret` objects and are redacted from every error text.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import jwt

from gtp5g_op.config import Policy, format_duration_ns
from gtp5g_op.errors import ApiError, OpError
from gtp5g_op.gthulhu.http import DEFAULT_DEADLINE, DEFAULT_MAX_BODY, HttpClient, HttpStatusError, Reply
from gtp5g_op.gthulhu.secret import Secret
from gtp5g_op.gthulhu.sync import PushOutcome
from gtp5g_op.model import Target

log = logging.getLogger(__name__)

LOGIN_PATH = "/api/v1/auth/login"
REFRESH_PATH = "/api/v1/auth/refresh"
LOGOUT_PATH = "/api/v1/auth/logout"
POLICIES_PATH = "/api/v1/node-scheduling-policies"
SELF_PATH = POLICIES_PATH + "/self"
WATCH, MANUAL = "watch", "manual"
_MARKERS = {WATCH: "gtp5g_op", MANUAL: "gtp5g_op_manual"}
_KINDS = {v: k for k, v in _MARKERS.items()}
#: v1.3.0 issues access tokens for one minute; used when a token does not say.
DEFAULT_ACCESS_LIFETIME = 60.0
_ID_RE = re.compile(r"[0-9a-f]{24}")
_OURS_RE = re.compile(r"\^\(\?P<(gtp5g_op|gtp5g_op_manual)>\)\(\?:(.*)\)\$", re.S)
_RE2_META = frozenset("\\.+*?()|[]{}^$")
_MAX_TOKEN = 16 << 10
COMM_MAX_BYTES = 15  # TASK_COMM_LEN - 1: what the Decision Maker reads from /proc/<pid>/comm
#: Seconds a push waits for its Decision Maker reading before reporting the previous one.
DM_WAIT = 0.25


# --- the commandRegex -------------------------------------------------------------------------------


def re2_escape(text: str) -> str:
    """``text`` as a literal in Go RE2 syntax (also valid, with the same meaning, in Python's ``re``).

    Python's ``re.escape`` escapes spaces and other characters with a backslash, which RE2 refuses
    (RE2 allows a backslash before punctuation only); control characters and spaces become ``\\xHH``.
    """
    out = []
    for ch in text:
        if ch in _RE2_META:
            out.append("\\" + ch)
        elif ch == " " or not ch.isprintable():
            if ord(ch) > 0xFF:
                raise ValueError(f"cannot write {ch!r} as a two-digit escape")
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return "".join(out)


def usable_comm(comm: str) -> bool:
    """Whether a comm can be matched exactly by a policy (UTF-8, at most 15 bytes, no unusual characters)."""
    try:
        raw = comm.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return 0 < len(raw) <= COMM_MAX_BYTES and all(ch.isprintable() or ord(ch) <= 0xFF for ch in comm)


def comm_regex(comms: Iterable[str], kind: str = WATCH) -> str:
    """The anchored regex that matches exactly ``comms``, with the ownership marker of ``kind``."""
    alternatives = "|".join(re2_escape(c) for c in sorted(set(comms)))
    return f"^(?P<{_MARKERS[kind]}>)(?:{alternatives})$"


def parse_regex(regex: str) -> tuple[str, tuple[str, ...]] | None:
    """``(kind, comms)`` of a regex :func:`comm_regex` wrote, None for any other regex."""
    m = _OURS_RE.fullmatch(regex)
    if not m:
        return None
    comms, current, body, i = [], [], m.group(2), 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1:i + 2]
            if nxt == "x" and re.fullmatch(r"[0-9A-Fa-f]{2}", body[i + 2:i + 4]):
                current.append(chr(int(body[i + 2:i + 4], 16)))
                i += 4
                continue
            if not nxt or nxt not in _RE2_META:
                return None
            current.append(nxt)
            i += 2
        elif ch == "|":
            comms.append("".join(current))
            current = []
            i += 1
        elif ch in _RE2_META:
            return None
        else:
            current.append(ch)
            i += 1
    comms.append("".join(current))
    if not all(comms):
        return None
    return _KINDS[m.group(1)], tuple(comms)


@dataclass(frozen=True)
class NodePolicy:
    """One node scheduling policy as ``/self`` lists it."""

    id: str
    node_names: tuple[str, ...] = ()
    command_regex: str = ""
    priority: int = 0
    execution_time: int = 0
    node_selectors: tuple[tuple[str, str], ...] = ()
    dra_selectors: int = 0

    @property
    def owner(self) -> str | None:
        """``watch`` or ``manual`` for gtp5g-op's policies, None for the user's other policies."""
        parsed = parse_regex(self.command_regex)
        return parsed[0] if parsed else None

    @property
    def comms(self) -> tuple[str, ...]:
        """The comms a gtp5g-op policy matches (empty for others)."""
        parsed = parse_regex(self.command_regex)
        return parsed[1] if parsed else ()

    def on_node_only(self, node: str) -> bool:
        return self.node_names == (node,) and not self.node_selectors and not self.dra_selectors

    def matches(self, comm: str) -> bool:
        """Whether this policy's regex matches ``comm`` (as the Decision Maker's unanchored MatchString)."""
        try:
            return re.search(self.command_regex, comm) is not None
        except (re.error, RecursionError, OverflowError, ValueError):  # RE2-only syntax, or garbage from the server
            return False

    def as_json(self) -> dict:
        return {
            "id": self.id, "nodeNames": list(self.node_names), "commandRegex": self.command_regex,
            "priority": self.priority, "executionTime": self.execution_time,
            "nodeSelectors": [{"key": k, "value": v} for k, v in self.node_selectors],
            "owner": self.owner, "comms": list(self.comms),
        }


def _policy(item: Any) -> NodePolicy | str:
    """A NodePolicy from one ``/self`` entry, or what is wrong with it."""
    if not isinstance(item, dict):
        return "not an object"
    pid = item.get("id")
    if not isinstance(pid, str) or not _ID_RE.fullmatch(pid):
        return "'id' is not a 24-digit hex id"
    names = item.get("nodeNames") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "'nodeNames' is not a list of strings"
    regex = item.get("commandRegex") or ""
    if not isinstance(regex, str):
        return "'commandRegex' is not a string"
    numbers = {}
    for key in ("priority", "executionTime"):
        value = item.get(key) or 0
        if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**63:
            return f"'{key}' is not an integer"
        numbers[key] = value
    selectors = item.get("nodeSelectors") or []
    if not isinstance(selectors, list) or not all(
        isinstance(s, dict) and isinstance(s.get("key", ""), str) and isinstance(s.get("value", ""), str) for s in selectors
    ):
        return "'nodeSelectors' is not a list of {key, value} strings"
    dra = item.get("draSelectors") or []
    if not isinstance(dra, list):
        return "'draSelectors' is not a list"
    return NodePolicy(
        pid, tuple(names), regex, numbers["priority"], numbers["executionTime"],
        tuple((s.get("key", ""), s.get("value", "")) for s in selectors), len(dra),
    )


def _token_lifetime(token: str) -> float:
    """Seconds an access token lives, from its own ``iat``/``exp`` (read, not verified: the client has no
    key for it), from ``exp`` and this host's clock when it has no ``iat``, else
    :data:`DEFAULT_ACCESS_LIFETIME`; it is only used to renew in time (a 401 renews anyway)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
        exp, iat = claims.get("exp"), claims.get("iat")
        if not _number(iat):
            iat = time.time()
        if _number(exp) and 1 < exp - iat < 7 * 86400:
            return float(exp - iat) - 1.0  # whole seconds: the token may be up to 1 s older than iat says
    except (jwt.InvalidTokenError, ValueError, TypeError, OverflowError):
        pass
    return DEFAULT_ACCESS_LIFETIME


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) < 2**53


# --- the client -----------------------------------------------------------------------------------


class ManagerClient:
    """A logged-in user of a Gthulhu v1.x Manager: node scheduling policies (list, create, update, delete)."""

    kind = "manager"

    def __init__(
        self,
        api_url: str,
        username: str,
        password: Secret,
        *,
        ca_bundle: str | None = None,
        insecure: bool = False,
        timeout: tuple[float, float] = (3.05, 5),
        retries: int = 2,
        backoff_factor: float = 0.2,
        backoff_jitter: float = 0.1,
        deadline: float = DEFAULT_DEADLINE,
        max_body: int = DEFAULT_MAX_BODY,
        password_source: Callable[[], Secret] | None = None,
    ):
        self.http = HttpClient(
            api_url, ca_bundle=ca_bundle, insecure=insecure, timeout=timeout, deadline=deadline, retries=retries,
            backoff_factor=backoff_factor, backoff_jitter=backoff_jitter, max_body=max_body,
        )
        self.http.redactor.add(password)
        self.api_url = self.http.base_url
        self.username = username
        self._password = password
        self._password_source = password_source  # reads the password file again (a rotated Kubernetes Secret)
        self._access: Secret | None = None
        self._refresh: Secret | None = None
        self._renew_at = 0.0
        self.token_renewals = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "logged in" if self._access else "not logged in"
        return f"ManagerClient({self.api_url!r}, user {self.username!r}, {state})"

    def close(self) -> None:
        """Log out (revoking the refresh token, best effort, 1 s at most), forget the tokens, drop connections."""
        refresh, self._access, self._refresh = self._refresh, None, None
        if refresh:
            try:
                with self.http.deadline_scope(1.0):
                    self.http.request("POST", LOGOUT_PATH, body={"refreshToken": refresh.reveal()})
            except ApiError as exc:
                log.debug("logout failed: %s", exc.one_line())
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tokens ------------------------------------------------------------------------------------

    def authenticate(self) -> None:
        """Log in now (checks the credentials before a long run)."""
        with self._lock:
            self._login()

    def _login(self) -> None:
        body = {"username": self.username, "password": self._password.reveal()}
        reply = self.http.request("POST", LOGIN_PATH, body=body)
        if reply.status == 401 and self._new_password():
            body["password"] = self._password.reveal()
            reply = self.http.request("POST", LOGIN_PATH, body=body)
        if reply.status >= 400:
            if reply.status in (401, 403, 422):
                fix = ("check --username (GTP5G_OP_USERNAME) and the password "
                       "(GTP5G_OP_PASSWORD or --password-file)")
            elif reply.status in (404, 405):
                fix = "this server has no Manager login: for a legacy Gthulhu API use --api legacy (or --api auto)"
            else:
                fix = "check the Gthulhu Manager's log"
            raise self.http.error(reply, fix)
        self._take_tokens(reply)

    def _new_password(self) -> bool:
        """After a refused login: read the password file again; True when it now holds another password."""
        if self._password_source is None:
            return False
        try:
            fresh = self._password_source()
        except OpError as exc:
            log.debug("cannot read the password again: %s", exc.one_line())
            return False
        if fresh.reveal() == self._password.reveal():
            return False
        self.http.redactor.add(fresh)
        self._password = fresh
        log.info("the password file changed; logging in to %s with the new password", self.api_url)
        return True

    def _renew(self) -> None:
        """Refresh the token pair, or log in again when the refresh token is refused."""
        if self._refresh is None:
            self._login()
            return
        reply = self.http.request("POST", REFRESH_PATH, body={"refreshToken": self._refresh.reveal()})
        if reply.status >= 400:
            log.debug("refreshing the token was refused (HTTP %d); logging in again", reply.status)
            self._login()
            return
        self._take_tokens(reply, refreshed=True)

    def _take_tokens(self, reply: Reply, refreshed: bool = False) -> None:
        """Keep the answer's tokens; a refresh answer without a refresh token keeps the current one."""
        doc = reply.json()
        data = doc.get("data") if isinstance(doc, dict) and isinstance(doc.get("data"), dict) else {}
        access = data.get("accessToken") or data.get("token")
        refresh = data.get("refreshToken")
        for value in (access, refresh):
            if isinstance(value, str) and 0 < len(value) <= _MAX_TOKEN:
                self.http.redactor.add(value)
        if not (isinstance(doc, dict) and doc.get("success") is True and isinstance(access, str)
                and 0 < len(access) <= _MAX_TOKEN):
            raise ApiError(f"{reply.method} {reply.url}: HTTP {reply.status} but the answer carries no token",
                           "check that --api-url is a Gthulhu v1.x Manager")
        lifetime = _token_lifetime(access)
        self._access = Secret(access)
        if isinstance(refresh, str) and 0 < len(refresh) <= _MAX_TOKEN:
            self._refresh = Secret(refresh)
        elif not refreshed:
            self._refresh = None
        self._renew_at = time.monotonic() + lifetime - min(10.0, lifetime * 0.2)
        self.token_renewals += 1
        log.debug("token from %s valid for %.0f s", reply.url, lifetime)

    def _token(self, force: bool = False) -> Secret:
        with self._lock:
            if self._access is None:
                self._login()
            elif force or time.monotonic() >= self._renew_at:
                self._renew()
            assert self._access is not None
            return self._access

    @property
    def token_valid_for(self) -> float | None:
        return None if self._access is None else max(0.0, self._renew_at - time.monotonic())

    # --- calls -------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, action: str, body: Any = None, idempotent: bool = True,
              node: str | None = None) -> dict:
        """An authenticated call; on 401 renew the token once and try again. Returns the JSON object."""
        reply = self.http.request(method, path, body=body, token=self._token(), idempotent=idempotent)
        if reply.status == 401:
            log.debug("%s %s answered 401; renewing the token once", method, path)
            reply = self.http.request(method, path, body=body, token=self._token(force=True), idempotent=idempotent)
        if reply.status >= 400:
            raise self.http.error(reply, self._fix(reply, action, node))
        doc = reply.json()
        if not isinstance(doc, dict) or doc.get("success") is not True:
            raise ApiError(
                f"{method} {reply.url}: HTTP {reply.status} but not a Gthulhu success answer: "
                f"{self.http.redactor.clean(reply.text())!r}",
                "check that --api-url is a Gthulhu v1.x Manager",
            )
        return doc

    def _fix(self, reply: Reply, action: str, node: str | None) -> str:
        words = reply.text().lower()
        if reply.status == 401:
            return "check --username and the password; the Manager refused the login's token"
        if reply.status == 403 and "password change" in words:
            return f"log in to the Gthulhu web UI as {self.username} once and change its password"
        if reply.status == 403:
            return (f"give the user {self.username} a role with the node_scheduling_policy.{action} permission "
                    f"(a Gthulhu admin can)")
        if reply.status == 404 and "no nodes match" in words:
            return (f"--node-name {node!r} must be a node the Manager knows (kubectl get nodes); the DaemonSet "
                    f"sets NODE_NAME from spec.nodeName")
        if reply.status in (404, 405) and action == "read":
            return "this Manager has no node scheduling policies: Gthulhu v1.3.0 or later is needed"
        if reply.status == 400:
            return "check that the Manager is Gthulhu v1.3.0 or later"
        return "check the Gthulhu Manager's log"

    def list_policies(self) -> list[NodePolicy]:
        """This user's node scheduling policies (``/self``), checked."""
        doc = self._call("GET", SELF_PATH, "read")
        data = doc.get("data")  # omitted when empty
        items = (data.get("policies") or []) if isinstance(data, dict) else [] if data is None else None
        if not isinstance(items, list):
            raise ApiError(f"GET {self.http.url(SELF_PATH)}: 'data.policies' is not a list",
                           "check that --api-url is a Gthulhu v1.3 (or later) Manager")
        policies = []
        for n, item in enumerate(items):
            policy = _policy(item)
            if isinstance(policy, str):
                raise ApiError(f"GET {self.http.url(SELF_PATH)}: policy {n}: {policy}",
                               "check that --api-url is a Gthulhu v1.3 (or later) Manager")
            policies.append(policy)
        return policies

    @staticmethod
    def _body(node: str, regex: str, priority: int, execution_time: int) -> dict:
        return {"nodeNames": [node], "commandRegex": regex, "priority": priority, "executionTime": execution_time}

    def create_policy(self, node: str, regex: str, priority: int, execution_time: int) -> None:
        """POST a node policy (the answer carries no id). Not sent again once it may have arrived."""
        self._call("POST", POLICIES_PATH, "create", self._body(node, regex, priority, execution_time),
                   idempotent=False, node=node)

    def update_policy(self, policy_id: str, node: str, regex: str, priority: int, execution_time: int) -> None:
        """PUT the whole policy ``policy_id``."""
        body = {"policyId": policy_id, **self._body(node, regex, priority, execution_time)}
        self._call("PUT", POLICIES_PATH, "update", body, node=node)

    def delete_policy(self, policy_id: str) -> None:
        """DELETE the policy ``policy_id``."""
        self._call("DELETE", POLICIES_PATH, "delete", {"policyId": policy_id})


def _gone(exc: ApiError) -> bool:
    """A 404 about the policy itself (deleted meanwhile), not about the nodes."""
    return isinstance(exc, HttpStatusError) and exc.status == 404 and "no nodes match" not in exc.message


# --- what a watch wants, and how to get there ---------------------------------------------------


def desired_groups(targets: Iterable[Target], policy: Policy) -> dict[tuple[int, int], tuple[str, ...]]:
    """(priority, executionTime) → the sorted comms that get it, from the targets' comms and ``policy``."""
    groups: dict[tuple[int, int], set[str]] = {}
    for comm in {t.comm for t in targets}:
        if not usable_comm(comm):
            log.debug("comm %r cannot be matched exactly by a policy; left out", comm)
            continue
        boost, execution_time = policy.resolve(comm)
        groups.setdefault((policy.manager_priority if boost else 0, execution_time), set()).add(comm)
    return {params: tuple(sorted(comms)) for params, comms in sorted(groups.items())}


@dataclass
class Plan:
    """The calls that turn ``current`` (gtp5g-op's policies on the node) into the desired groups."""

    keep: list[NodePolicy] = field(default_factory=list)
    update: list[tuple[NodePolicy, tuple[int, int], tuple[str, ...]]] = field(default_factory=list)
    create: list[tuple[tuple[int, int], tuple[str, ...]]] = field(default_factory=list)
    delete: list[NodePolicy] = field(default_factory=list)

    @property
    def changes(self) -> int:
        return len(self.update) + len(self.create) + len(self.delete)


def plan(current: Sequence[NodePolicy], groups: dict[tuple[int, int], tuple[str, ...]], kind: str = WATCH) -> Plan:
    """Keep exact matches, update others in place (fewest calls), create what is missing, delete the rest."""
    result = Plan()
    pool = list(current)
    missing = []
    for params, comms in groups.items():
        regex = comm_regex(comms, kind)
        exact = next((p for p in pool if p.command_regex == regex and (p.priority, p.execution_time) == params), None)
        if exact is not None:
            pool.remove(exact)
            result.keep.append(exact)
        else:
            missing.append((params, comms))
    for params, comms in missing:
        if pool:
            same = next((p for p in pool if (p.priority, p.execution_time) == params), pool[0])
            pool.remove(same)
            result.update.append((same, params, comms))
        else:
            result.create.append((params, comms))
    result.delete = pool  # duplicates (a create that landed twice) and leftovers
    return result


def apply(client: ManagerClient, node: str, todo: Plan, kind: str = WATCH) -> None:
    """Make the calls of ``todo``; a policy deleted meanwhile is created again, one already gone is fine."""
    for policy, (priority, execution_time), comms in todo.update:
        try:
            client.update_policy(policy.id, node, comm_regex(comms, kind), priority, execution_time)
        except ApiError as exc:
            if not _gone(exc):
                raise
            client.create_policy(node, comm_regex(comms, kind), priority, execution_time)
    for (priority, execution_time), comms in todo.create:
        client.create_policy(node, comm_regex(comms, kind), priority, execution_time)
    for policy in todo.delete:
        try:
            client.delete_policy(policy.id)
        except ApiError as exc:
            if not _gone(exc):
                raise


class ManagerBackend:
    """Makes a Manager hold one watch policy per (priority, time slice) for the targets' comms on ``node``.

    With a Decision Maker reader (``dm``), every push also asks which PIDs the node really boosts
    under these policies and which of them validation did not accept. That read is optional and goes
    to another server, so it runs in its own thread: a push waits for it at most :data:`DM_WAIT`
    seconds (a local Decision Maker answers well within that) and otherwise reports the last reading
    made for the same policies. A Decision Maker that hangs or refuses connections therefore never
    delays the next change reaching the Manager.
    """

    kind = "manager"

    def __init__(self, client: ManagerClient, node: str, policy: Policy, dm: Any = None):
        self.client = client
        self.http = client.http
        self.api_url = client.api_url
        self.node = node
        self.policy = policy
        self.dm = dm  # gtp5g_op.gthulhu.dm.DecisionMakerReader or None
        self._dm_failing = False
        self._dm_lock = threading.Lock()
        self._dm_reading: threading.Event | None = None  # set when the read in flight ends
        self._dm_last: tuple[frozenset[str], dict[int, str]] | None = None  # (regexes read for, PID → regex)
        self._closing = False

    @property
    def token_renewals(self) -> int:
        return self.client.token_renewals

    def push(self, targets: frozenset[Target]) -> PushOutcome:
        groups = desired_groups(targets, self.policy)
        mine = [p for p in self.client.list_policies() if p.owner == WATCH and p.on_node_only(self.node)]
        todo = plan(mine, groups)
        apply(self.client, self.node, todo)
        comms = sorted({c for cs in groups.values() for c in cs})
        summary = (f"{len(groups)} node polic{'y' if len(groups) == 1 else 'ies'} for {', '.join(comms) or 'no comm'} "
                   f"on node {self.node}")
        if todo.changes:
            log.info("node %s: %s", self.node, _plan_text(todo))
        outcome = PushOutcome(owned=len(groups), summary=summary)
        if self.dm is not None:
            self._read_dm(outcome, frozenset(comm_regex(cs) for cs in groups.values()), targets)
        return outcome

    def _read_dm(self, outcome: PushOutcome, regexes: frozenset[str], targets: frozenset[Target]) -> None:
        """Start a Decision Maker read (unless one is in flight), wait :data:`DM_WAIT` s, report the last reading."""
        with self._dm_lock:
            reading = self._dm_reading
            if reading is None:
                reading = self._dm_reading = threading.Event()
                threading.Thread(target=self._dm_read, args=(regexes, reading), name="dm-reader", daemon=True).start()
        reading.wait(DM_WAIT)
        with self._dm_lock:
            last = self._dm_last
        if last is None or last[0] != regexes:
            return  # nothing read yet for these policies
        validated = {t.pid for t in targets} | {t.tgid for t in targets if t.tgid}
        outcome.boosted = sorted(last[1])
        outcome.unvalidated = sorted(set(last[1]) - validated)

    def _dm_read(self, regexes: frozenset[str], done: threading.Event) -> None:
        try:
            boosted = self.dm.boosted(set(regexes))
        except ApiError as exc:
            if not self._dm_failing and not self._closing:
                log.warning("cannot read the Decision Maker at %s: %s", self.dm.api_url, exc.one_line())
            self._dm_failing = True
        except Exception:  # noqa: BLE001 - an optional reading must not kill its thread silently
            log.warning("reading the Decision Maker at %s failed", self.dm.api_url, exc_info=True)
        else:
            if self._dm_failing:
                log.warning("the Decision Maker at %s answers again", self.dm.api_url)
            self._dm_failing = False
            with self._dm_lock:
                self._dm_last = (regexes, boosted)
        finally:
            with self._dm_lock:
                self._dm_reading = None
            done.set()

    def close(self) -> None:
        self._closing = True
        if self.dm is not None:
            self.dm.client.http.abort()  # a read still in flight ends now
        self.client.close()
        if self.dm is not None:
            self.dm.close()


def _plan_text(todo: Plan) -> str:
    parts = [f"updated policy {p.id} to {', '.join(c)}" for p, _, c in todo.update]
    parts += [f"created a policy for {', '.join(c)}" for _, c in todo.create]
    parts += [f"deleted policy {p.id}" for p in todo.delete]
    return "; ".join(parts)


# --- one-shot operations for the CLI ---------------------------------------------------------------


@dataclass
class ManualResult:
    """What ``strategies push --comm`` / ``delete --comm`` did."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)  # comms


def push_comms(client: ManagerClient, node: str, comms: Sequence[str], priority: int, execution_time: int) -> ManualResult:
    """One manual policy per comm on ``node`` (created, or updated in place when it exists).

    A comm that another of this user's policies on the node already matches (a watch's, or one made by
    hand) is refused: a second policy for the same processes would conflict.
    """
    bad = [c for c in comms if not usable_comm(c)]
    if bad:
        raise OpError(f"comm {bad[0]!r} cannot be matched exactly (1 to {COMM_MAX_BYTES} bytes of UTF-8)",
                      "give the comm as /proc/<pid>/comm shows it")
    policies = [p for p in client.list_policies() if applies_to(p, node) is not False]
    result = ManualResult()
    todo: list[tuple[str, NodePolicy | None]] = []
    for comm in sorted(set(comms)):
        own = next((p for p in policies if p.owner == MANUAL and p.on_node_only(node) and p.comms == (comm,)), None)
        others = [p for p in policies if p is not own and p.matches(comm)]
        if others:
            other = others[0]
            who = {WATCH: "the watch's policy", MANUAL: "gtp5g-op's manual policy"}.get(other.owner or "", "the policy")
            raise OpError(
                f"comm {comm} on node {node} is already matched by {who} {other.id} "
                f"(commandRegex {other.command_regex}, priority {other.priority}); a second policy would conflict",
                "change or delete that policy first" if other.owner != WATCH
                else "the running watch already boosts it; nothing to push",
            )
        todo.append((comm, own))
    for comm, own in todo:
        regex = comm_regex([comm], MANUAL)
        if own is None:
            client.create_policy(node, regex, priority, execution_time)
            result.created.append(comm)
        elif (own.priority, own.execution_time) != (priority, execution_time):
            client.update_policy(own.id, node, regex, priority, execution_time)
            result.updated.append(comm)
    return result


def delete_comms(client: ManagerClient, node: str, comms: Sequence[str]) -> list[str]:
    """Remove ``comms`` from gtp5g-op's policies on ``node`` (manual and watch); returns the comms removed."""
    wanted = set(comms)
    removed: set[str] = set()
    policies = client.list_policies()
    for policy in policies:
        if policy.owner is None or not policy.on_node_only(node) or not wanted & set(policy.comms):
            continue
        left = tuple(c for c in policy.comms if c not in wanted)
        removed |= wanted & set(policy.comms)
        if left:
            client.update_policy(policy.id, node, comm_regex(left, policy.owner), policy.priority, policy.execution_time)
        else:
            client.delete_policy(policy.id)
    if not removed:
        others = [p for p in policies if p.owner is None and any(p.matches(c) for c in wanted)]
        extra = f"; policy {others[0].id} (commandRegex {others[0].command_regex}) matches it: change that policy instead" if others else ""
        raise OpError(f"no gtp5g-op policy for comm {', '.join(sorted(wanted))} on node {node} at {client.api_url}{extra}",
                      "see `gtp5g-op strategies list`")
    return sorted(removed)


def prune(client: ManagerClient, node: str) -> list[NodePolicy]:
    """Delete every gtp5g-op policy (watch and manual) on ``node``; returns those deleted."""
    deleted = []
    for policy in client.list_policies():
        if policy.owner is not None and policy.on_node_only(node):
            try:
                client.delete_policy(policy.id)
            except ApiError as exc:
                if not _gone(exc):
                    raise
            deleted.append(policy)
    return deleted


def applies_to(policy: NodePolicy, node: str) -> bool | None:
    """Whether ``policy`` covers ``node``: the Manager ANDs the non-empty selector kinds, and this client
    cannot evaluate node labels or DRA devices, so a policy with such selectors is None (unknown) unless
    its node names already leave ``node`` out."""
    if policy.node_names and node not in policy.node_names:
        return False
    if policy.node_selectors or policy.dra_selectors:
        return None
    return bool(policy.node_names)


def describe(policies: Sequence[NodePolicy], node: str) -> list[dict]:
    """Rows for ``strategies list`` against a Manager."""
    rows = []
    for p in policies:
        rows.append(p.as_json() | {
            "this_node": applies_to(p, node),
            "execution_time_human": format_duration_ns(p.execution_time) if p.execution_time > 0 else "-",
        })
    return rows
