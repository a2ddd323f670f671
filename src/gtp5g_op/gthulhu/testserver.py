"""A Gthulhu-compatible API server with switchable faults: a test double, since this machine has no Gthulhu.

Three modes, each a real HTTP server on 127.0.0.1 speaking the contract described in docs/api.md:

- ``--mode legacy`` (default): the legacy API (Gthulhu/api up to v0.1.0): token from the public key,
  RS256 JWTs with a configurable lifetime, both token answer shapes, POST replaces the whole set, GET
  expands selector strategies into per-PID entries. There is no Kubernetes here, so the pods that
  selectors match come from a static list (``--pods FILE`` or the control endpoint); like the real
  server, expanded entries keep ``selectors`` but lose ``command_regex``, and a selector strategy that
  matches no process does not appear in GET at all. Unknown routes answer gorilla/mux's plain 404.
- ``--mode manager``: the v1.3 Manager's auth and node scheduling policies: ``POST /api/v1/auth/login``
  (empty field 422, unknown user or wrong password 401), refresh and logout, bearer access tokens
  (RS256; lifetime ``--token-lifetime``, one minute like v1.3.0 unless given), RBAC (role ``admin``
  may do everything, ``reader`` only read: 403 ``permission denied``), ``/self`` listing each user's
  own policies, POST answering no id, PUT/DELETE by ``policyId`` (another user's: 404; a malformed id:
  500 like the real one), 404 ``no nodes match`` for unknown node names (``--nodes``), Go's typing of
  the body (a JSON ``true`` or ``1.5`` as ``priority`` is a 400 ``Invalid request body``), errors as
  ``{"success": false, "error"}``, and echo's routing: ``{"message": "Not Found"}`` for unknown routes,
  also for a known ``/api`` path with another method (the ``/api`` group's catch-all wins over a 405),
  and the embedded web UI's index.html for any other GET outside ``/api``.
  ``--dm-port P`` adds that node's Decision Maker (``--dm-node``) on a second port, fed by this Manager.
- ``--mode dm``: a Decision Maker alone: the public-key token (new shape), ``GET
  /api/v1/scheduling/strategies`` resolving its node policies (``POST /api/v1/node-intents``, or the
  control endpoint) to the PIDs of this machine's real processes whose ``/proc/<pid>/comm`` matches,
  thread-group leaders only as in v1.3.0 (``--dm-threads``: every thread, as after PR #135).

Faults are switched at run time with ``POST /_control`` (no token; bind to 127.0.0.1 only):
``{"fault": "500"|"slow"|"401"|"401-next"|"bad-json"|"down"|"foreign-token"|null, "slow_seconds": 2,
"count": 3}``; ``count`` ends the fault after that many API requests. ``401`` refuses every token-carrying call
(tokens are still issued), ``401-next`` only the next one. ``down`` drops the connection
without an answer (stop the process for refused connections); ``foreign-token`` hands out a token
signed by another key (a server that is not the one the public key belongs to). ``GET /_control`` shows
the state, the raw posted set or policies, and request counters.

The standard library's ThreadingHTTPServer is enough for a local test double (one thread per
connection, keep-alive with HTTP/1.1) and adds no dependency; it is not meant to face a network.

Usage::

    python -m gtp5g_op.gthulhu.testserver --port 8080 --public-key-out /tmp/gthulhu.pub
    python -m gtp5g_op.gthulhu.testserver --mode manager --port 8080 --user ops:secret --dm-port 8081
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import re
import ssl
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gtp5g_op.config import DEFAULT_KNOWN_SELECTORS

log = logging.getLogger(__name__)

MODES = ("legacy", "manager", "dm")
FAULTS = ("500", "slow", "401", "401-next", "bad-json", "down", "foreign-token")
ROLES = {
    "admin": {"node_scheduling_policy.create", "node_scheduling_policy.read", "node_scheduling_policy.update",
              "node_scheduling_policy.delete", "node_scheduling_intent.read"},
    "reader": {"node_scheduling_policy.read", "node_scheduling_intent.read"},
    "none": set(),
}
ISSUER = "bss-api-server"
DEFAULT_PODS: list[dict] = [
    {
        "pod_name": "ueransim-gnb-0",
        "namespace": "free5gc",
        "pod_uid": "0b6e4f1c-demo",
        "labels": {"app": "ueransim-macvlan"},
        "processes": [{"pid": 4242, "command": "nr-gnb"}, {"pid": 4250, "command": "bash"}],
    }
]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class BadRequest(ValueError):
    """A request body the real server would answer with 400."""


class HttpError(Exception):
    """An answer ``{"success": false, "error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def normalise_strategy(item: Any) -> dict:
    """One posted strategy as the Go server would store it: known fields only, zero values omitted."""
    if not isinstance(item, dict):
        raise BadRequest("strategy is not an object")
    out: dict[str, Any] = {}
    priority = item.get("priority", False)
    if not isinstance(priority, bool):
        raise BadRequest("priority must be a boolean")
    out["priority"] = priority
    exe = item.get("execution_time", 0)
    if not isinstance(exe, int) or isinstance(exe, bool) or exe < 0:
        raise BadRequest("execution_time must be a non-negative integer (ns)")
    out["execution_time"] = exe
    pid = item.get("pid", 0)
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise BadRequest("pid must be an integer")
    if pid:
        out["pid"] = pid
    sels = item.get("selectors") or []
    if not isinstance(sels, list) or not all(
        isinstance(s, dict) and isinstance(s.get("key", ""), str) and isinstance(s.get("value", ""), str) for s in sels
    ):
        raise BadRequest("selectors must be a list of {key, value} strings")
    if sels:
        out["selectors"] = [{"key": s.get("key", ""), "value": s.get("value", "")} for s in sels]
    regex = item.get("command_regex", "")
    if not isinstance(regex, str):
        raise BadRequest("command_regex must be a string")
    if regex:
        out["command_regex"] = regex
    return out


def _go_int(body: dict, key: str) -> int:
    """A Go ``int``/``int64`` field as encoding/json decodes it: absent or null is 0, only integer literals."""
    value = body.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**63:
        raise BadRequest(f"json: cannot unmarshal {type(value).__name__} into Go struct field .{key} of type int")
    return value


def _go_strings(body: dict, key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"json: cannot unmarshal into Go struct field .{key} of type []string")
    return list(value)


def _go_selectors(body: dict, key: str) -> list[dict]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(s, dict) and isinstance(s.get("key", ""), str) and isinstance(s.get("value", ""), str) for s in value
    ):
        raise BadRequest(f"json: cannot unmarshal into Go struct field .{key}")
    return [{"key": s.get("key", ""), "value": s.get("value", "")} for s in value]


def node_policy(body: Any, creator: str) -> dict:
    """A posted node scheduling policy as the Manager stores it (Go's typing of the request body)."""
    if not isinstance(body, dict):
        raise BadRequest("json: cannot unmarshal into Go value of type rest.CreateNodeSchedulingPolicyRequest")
    regex = body.get("commandRegex")
    if regex is not None and not isinstance(regex, str):
        raise BadRequest("json: cannot unmarshal into Go struct field .commandRegex of type string")
    dra = body.get("draSelectors")
    if dra is not None and not isinstance(dra, list):
        raise BadRequest("json: cannot unmarshal into Go struct field .draSelectors")
    return {
        "creator": creator,
        "nodeSelectors": _go_selectors(body, "nodeSelectors"),
        "nodeNames": _go_strings(body, "nodeNames"),
        "draSelectors": list(dra or []),
        "commandRegex": regex or "",
        "priority": _go_int(body, "priority"),
        "executionTime": _go_int(body, "executionTime"),
    }


def policy_view(policy: dict) -> dict:
    """A stored policy as ``/self`` answers it (Go's omitempty: zero values left out)."""
    out: dict[str, Any] = {"id": policy["id"]}
    for key in ("nodeSelectors", "nodeNames", "draSelectors", "commandRegex", "priority", "executionTime"):
        if policy.get(key):
            out[key] = policy[key]
    return out


def process_comms(threads: bool = False, proc: Path = Path("/proc")) -> dict[int, str]:
    """PID → comm of this machine's processes (thread-group leaders; every thread with ``threads``)."""
    out: dict[int, str] = {}
    pattern = "[0-9]*/task/[0-9]*/comm" if threads else "[0-9]*/comm"
    for path in proc.glob(pattern):
        try:
            out[int(path.parent.name)] = path.read_text().rstrip("\n")
        except (OSError, ValueError):
            continue
    return out


class ServerState:
    """Everything the handlers read or change, behind one lock."""

    def __init__(self, private_key: rsa.RSAPrivateKey, token_lifetime: int = 86400, token_shape: str = "old",
                 mode: str = "legacy"):
        self.lock = threading.RLock()
        self.mode = mode
        self.private_key = private_key
        self.public_key = private_key.public_key()
        self.token_lifetime = token_lifetime
        self.token_shape = token_shape
        self.strategies: list[dict] = [normalise_strategy(s) for s in copy.deepcopy(DEFAULT_KNOWN_SELECTORS)]
        self.pods: list[dict] = copy.deepcopy(DEFAULT_PODS)
        self.fault: str | None = None
        self.fault_count: int | None = None
        self.slow_seconds = 2.0
        self.stats: dict[str, int] = {}
        # Manager mode
        self.users: dict[str, dict] = {}
        self.nodes: list[str] = [platform.node(), "node-a", "node-b"]
        self.policies: list[dict] = []
        self.refresh_sessions: dict[str, dict] = {}
        # Decision Maker
        self.dm_node = platform.node()
        self.dm_threads = False
        self.dm_policies: list[dict] = []  # dm mode: what the node-intents POST set

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def count(self, name: str) -> None:
        with self.lock:
            self.stats[name] = self.stats.get(name, 0) + 1

    def take_fault(self, authenticated: bool) -> str | None:
        """The fault for this API request (consuming one use of ``count``)."""
        with self.lock:
            fault = self.fault
            if (
                fault is None
                or (fault in ("401", "401-next") and not authenticated)
                or (fault == "foreign-token" and authenticated)
            ):
                return None
            if fault == "401-next":
                self.fault = None
            elif self.fault_count is not None:
                self.fault_count -= 1
                if self.fault_count <= 0:
                    self.fault, self.fault_count = None, None
            self.count(f"fault:{fault}")
            return fault

    def issue_token(self, client_id: str, foreign: bool = False) -> tuple[str, int]:
        """A signed JWT for ``client_id`` and its expiry; ``foreign`` signs with a throw-away key."""
        now = int(time.time())
        exp = now + self.token_lifetime
        claims = {"client_id": client_id, "iss": ISSUER, "sub": client_id, "iat": now, "nbf": now, "exp": exp}
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if foreign else self.private_key
        return jwt.encode(claims, key, algorithm="RS256"), exp

    def add_user(self, name: str, password: str, role: str = "admin") -> None:
        if role not in ROLES:
            raise BadRequest(f"role must be one of {', '.join(ROLES)}")
        self.users[name] = {"id": uuid.uuid4().hex[:24], "password": password, "role": role, "token_version": 1}

    def user_by_id(self, uid: str) -> tuple[str, dict] | None:
        return next(((n, u) for n, u in self.users.items() if u["id"] == uid), None)

    def token_pair(self, name: str) -> dict:
        """An access and a refresh token for user ``name`` (a new refresh session)."""
        user, now, jti = self.users[name], int(time.time()), uuid.uuid4().hex
        common = {"uid": user["id"], "tokenVersion": user["token_version"], "iss": ISSUER, "sub": user["id"],
                  "iat": now, "nbf": now}
        access = jwt.encode({**common, "tokenType": "access", "exp": now + self.token_lifetime}, self.private_key,
                            algorithm="RS256")
        refresh = jwt.encode({**common, "tokenType": "refresh", "jti": jti, "exp": now + 86400}, self.private_key,
                             algorithm="RS256")
        self.refresh_sessions[jti] = {"user": name, "revoked": False}
        self.count("tokens_issued")
        return {"token": access, "accessToken": access, "refreshToken": refresh}

    def verify(self, token: str, token_type: str) -> tuple[str, dict]:
        """The user a token belongs to; HttpError 401 like the Manager's parseAndValidateToken."""
        try:
            claims = jwt.decode(token, self.public_key, algorithms=["RS256"], issuer=ISSUER)
        except jwt.ExpiredSignatureError:
            self.count("token_expired")
            raise HttpError(401, "invalid or expired token") from None
        except jwt.InvalidTokenError:
            self.count("token_invalid")
            raise HttpError(401, "invalid or expired token") from None
        if claims.get("tokenType") != token_type:
            raise HttpError(401, "invalid token type")
        found = self.user_by_id(str(claims.get("uid")))
        if found is None:
            raise HttpError(401, "user not found")
        if found[1]["token_version"] != claims.get("tokenVersion"):
            raise HttpError(401, "token revoked")
        return found[0], claims

    def nodes_of(self, policy: dict) -> list[str]:
        """The known nodes a policy matches (node names AND node selectors; none without a selector)."""
        if not policy["nodeNames"] and not policy["nodeSelectors"]:
            return []
        matched = [n for n in self.nodes if not policy["nodeNames"] or n in policy["nodeNames"]]
        if policy["nodeSelectors"]:  # nodes here carry one label: kubernetes.io/hostname=<name>
            matched = [n for n in matched if all(s["key"] == "kubernetes.io/hostname" and s["value"] == n
                                                 for s in policy["nodeSelectors"])]
        return matched

    def resolved(self) -> list[dict]:
        """GET's view: selector strategies expanded per matching process, like the real server."""
        out = []
        for strategy in self.strategies:
            if strategy.get("selectors"):
                try:
                    regex = re.compile(strategy.get("command_regex") or ".*")
                except re.error:
                    continue
                for pod in self.pods:
                    labels = pod.get("labels", {})
                    if all(labels.get(s["key"]) == s["value"] for s in strategy["selectors"]):
                        for proc in pod.get("processes", []):
                            if regex.search(proc.get("command", "")):
                                out.append(
                                    {
                                        "priority": strategy["priority"],
                                        "execution_time": strategy["execution_time"],
                                        "pid": proc["pid"],
                                        "selectors": strategy["selectors"],
                                    }
                                )
            elif strategy.get("pid"):
                out.append(dict(strategy))
        return out

    def dm_resolved(self) -> list[dict]:
        """The Decision Maker's view: its node's policies resolved against this machine's processes."""
        with self.lock:
            if self.mode == "manager":
                policies = [p for p in self.policies if self.dm_node in self.nodes_of(p)]
            else:
                policies = list(self.dm_policies)
            threads = self.dm_threads
        comms = process_comms(threads)
        out = []
        for policy in policies:
            try:
                regex = re.compile(policy["commandRegex"])
            except (re.error, KeyError):
                continue
            if not policy["commandRegex"]:
                continue
            for pid, comm in sorted(comms.items()):
                if regex.search(comm):
                    out.append({"priority": policy["priority"], "execution_time": policy["executionTime"], "pid": pid,
                                "command_regex": policy["commandRegex"]})
        return out


class Handler(BaseHTTPRequestHandler):
    """Routes of the three modes plus ``/_control``; ``mode`` is set on the subclass made by make_server."""

    protocol_version = "HTTP/1.1"
    server_version = "gthulhu-testserver"
    state: ServerState
    mode = "legacy"
    foreign_token = False  # set per request by the foreign-token fault

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # --- helpers ---------------------------------------------------------------------------------

    def _reply(self, status: int, doc: Any = None, raw: bytes | None = None,
               content_type: str | None = "application/json") -> None:
        body = raw if raw is not None else json.dumps(doc).encode()
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, {"success": False, "error": message})

    #: Paths of routes the modes have besides the ones the test server implements (for 404 vs 405).
    OTHER_ROUTES = {
        "legacy": {"/api/v1/auth/token", "/api/v1/metrics", "/health", "/"},
        "manager": {"/health", "/version"},
        "dm": {"/health", "/version", "/metrics"},
    }

    def _not_found(self, method: str, known_path: bool) -> None:
        """What the real server's router answers for a request no handler here takes."""
        path = self.path.split("?", 1)[0]
        known_path = known_path or path in self.OTHER_ROUTES[self.mode]
        if self.mode == "legacy":  # gorilla/mux: a route's middlewares (CORS) run only when it matches
            if method == "OPTIONS" and path.startswith("/api/v1/") and known_path:
                self.send_response(200)
                self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Access-Control-Allow-Methods", "POST, GET, OPTIONS")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif known_path:
                self._reply(405, raw=b"", content_type=None)  # mux's methodNotAllowedHandler: the status only
            else:
                self._reply(404, raw=b"404 page not found\n", content_type="text/plain; charset=utf-8")
            return
        # echo v4: the /api group's middleware registers a catch-all not-found route, which wins over
        # a 405, so under /api a known path with another method is a 404 too.
        under_api = path == "/api" or path.startswith("/api/")
        if known_path and not under_api:
            self._reply(405, {"message": "Method Not Allowed"})
        elif self.mode == "manager" and method == "GET" and not under_api:
            # the Manager embeds its web UI: any other GET is the single-page app's index.html
            self._reply(200, raw=b"<!doctype html><html><body><div id=\"root\"></div></body></html>",
                        content_type="text/html; charset=utf-8")
        else:
            self._reply(404, {"message": "Not Found"})

    def _body(self) -> Any:
        try:
            return json.loads(self._raw or b"null")
        except ValueError as exc:
            raise BadRequest(f"invalid JSON: {exc}") from None

    def _bearer(self) -> str | None:
        header = self.headers.get("Authorization", "")
        return header[7:] if header.startswith("Bearer ") and len(header) > 7 else None

    def _authorised(self) -> bool:
        token = self._bearer()
        if token is None:
            self._error(401, "Authorization header missing or not a Bearer token")
            return False
        try:
            jwt.decode(token, self.state.public_key, algorithms=["RS256"], issuer=ISSUER)
        except jwt.ExpiredSignatureError:
            self.state.count("token_expired")
            self._error(401, "Invalid token: token has expired")
            return False
        except jwt.InvalidTokenError:
            self.state.count("token_invalid")
            self._error(401, "Invalid token")
            return False
        return True

    def _apply_fault(self, authenticated: bool) -> bool:
        """Act out the current fault; True when the request was answered (or dropped) by it."""
        fault = self.state.take_fault(authenticated)
        if fault is None:
            return False
        if fault == "slow":
            time.sleep(self.state.slow_seconds)
            return False
        if fault == "foreign-token":
            self.foreign_token = True
            return False
        if fault == "down":
            self.close_connection = True
            return True
        if fault == "500":
            self._error(500, "injected fault: internal server error")
        elif fault == "bad-json":
            self._reply(200, raw=b"<html>injected fault: not json")
        elif fault in ("401", "401-next"):
            self._error(401, "Invalid token: injected fault")
        return True

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        self.state.count(f"{method} {path}")
        # Read the whole body first, even when the answer does not need it: with keep-alive an
        # unread body would be taken for the next request.
        length = int(self.headers.get("Content-Length") or 0)
        self._raw = self.rfile.read(length) if length else b""
        try:
            if path == "/_control":
                self._control(method)
            elif (path == "/health" or (path == "/" and self.mode == "legacy")) and method == "GET":
                if not self._apply_fault(False):
                    self._reply(200, {"status": "healthy", "timestamp": _now(), "service": "gthulhu-testserver"})
            elif path == "/version" and method == "GET" and self.mode != "legacy":
                endpoints = ("/health, /version, POST_/api/v1/intents, GET_/api/v1/scheduling/strategies"
                             if self.mode == "dm" else "/api/v1/auth/token (POST), /health (GET), /static/ (Frontend)")
                self._reply(200, {"message": "BSS Metrics API Server", "version": "1.0.0", "endpoints": endpoints})
            elif self.mode == "manager":
                self._manager(method, path)
            elif self.mode == "dm":
                self._dm(method, path)
            else:
                self._legacy(method, path)
        except BadRequest as exc:
            self._error(400, f"Invalid request payload: {exc}" if self.mode != "manager" else "Invalid request body")
        except HttpError as exc:
            self._error(exc.status, exc.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    # --- legacy ----------------------------------------------------------------------------------

    def _legacy(self, method: str, path: str) -> None:
        if path == "/api/v1/auth/token" and method == "POST":
            if not self._apply_fault(False):
                self._token()
            return
        routes = {
            ("GET", "/api/v1/scheduling/strategies"): self._get_strategies,
            ("POST", "/api/v1/scheduling/strategies"): self._post_strategies,
            ("GET", "/api/v1/pods/pids"): self._pods,
        }
        route = routes.get((method, path))
        if route is None:
            self._not_found(method, any(p == path for _, p in routes))
            return
        if self._apply_fault(True) or not self._authorised():
            return
        route()

    def _token(self, shape: str | None = None) -> None:
        body = self._body()
        if body is not None and not isinstance(body, dict):
            raise BadRequest("json: cannot unmarshal into Go value of type rest.TokenRequest")
        pem = (body or {}).get("public_key") or ""  # absent: Go's zero value, refused below as a bad key
        if not isinstance(pem, str):
            raise BadRequest("json: cannot unmarshal into Go struct field TokenRequest.public_key of type string")
        try:
            given = serialization.load_pem_public_key(pem.encode())
        except ValueError:
            self._error(401, "Public key verification failed: not a PEM public key")
            return
        if not isinstance(given, rsa.RSAPublicKey) or given.public_numbers() != self.state.public_key.public_numbers():
            self.state.count("token_refused")
            self._error(401, "Public key verification failed: key does not match the server's private key")
            return
        with self.state.lock:
            token, exp = self.state.issue_token(str(body.get("client_id") or "gtp5g-op"), self.foreign_token)
            self.state.count("tokens_issued")
            shape = shape or self.state.token_shape
        if shape == "new":
            self._reply(200, {"success": True, "data": {"token": token, "expired_at": exp}, "timestamp": _now()})
        else:
            self._reply(200, {"success": True, "message": "Token generated successfully", "timestamp": _now(), "token": token})

    def _get_strategies(self) -> None:
        with self.state.lock:
            resolved = self.state.resolved()
        self._reply(200, {"success": True, "message": "Scheduling strategies retrieved", "timestamp": _now(),
                          "scheduling": resolved or None})  # Go's nil slice: null when nothing resolves

    def _post_strategies(self) -> None:
        body = self._body()
        if not isinstance(body, dict):
            raise BadRequest("body must be an object with 'strategies'")
        items = body.get("strategies") or []
        if not isinstance(items, list):
            raise BadRequest("strategies must be a list")
        strategies = [normalise_strategy(i) for i in items]
        with self.state.lock:
            self.state.strategies = strategies
            self.state.count("posts")
        self._reply(200, {"success": True, "message": "Scheduling strategies saved successfully", "timestamp": _now()})

    def _pods(self) -> None:
        with self.state.lock:
            pods = [{k: v for k, v in p.items() if k != "labels"} for p in self.state.pods]
        self._reply(200, {"success": True, "message": "Pod-PID mappings retrieved successfully", "timestamp": _now(), "pods": pods})

    # --- manager ---------------------------------------------------------------------------------

    def _ok(self, data: Any = None) -> None:
        doc: dict[str, Any] = {"success": True, "timestamp": _now()}
        if data is not None:
            doc["data"] = data
        self._reply(200, doc)

    def _manager(self, method: str, path: str) -> None:
        public = {("POST", "/api/v1/auth/login"): self._login, ("POST", "/api/v1/auth/refresh"): self._refresh,
                  ("POST", "/api/v1/auth/logout"): self._logout}
        policies = "/api/v1/node-scheduling-policies"
        guarded = {
            ("POST", policies): ("node_scheduling_policy.create", self._create_policy),
            ("PUT", policies): ("node_scheduling_policy.update", self._update_policy),
            ("DELETE", policies): ("node_scheduling_policy.delete", self._delete_policy),
            ("GET", policies + "/self"): ("node_scheduling_policy.read", self._self_policies),
            ("GET", "/api/v1/node-scheduling-intents/self"): ("node_scheduling_intent.read", self._self_intents),
        }
        if (method, path) in public:
            if not self._apply_fault(False):
                public[(method, path)]()
            return
        if (method, path) not in guarded:
            self._not_found(method, any(p == path for _, p in [*public, *guarded]))
            return
        if self._apply_fault(True):
            return
        permission, route = guarded[(method, path)]
        route(self._manager_user(permission))

    def _manager_user(self, permission: str) -> str:
        """The calling user (Manager's auth middleware and RBAC)."""
        header = self.headers.get("Authorization", "")
        if not header:
            raise HttpError(401, "Missing Authorization header")
        token = self._bearer()
        if token is None:
            raise HttpError(401, "Invalid Authorization header format")
        with self.state.lock:
            name, _ = self.state.verify(token, "access")
            if permission not in ROLES[self.state.users[name]["role"]]:
                raise HttpError(403, "permission denied")
        return name

    def _login(self) -> None:
        body = self._body()
        if not isinstance(body, dict):
            raise BadRequest("not an object")
        name, password = body.get("username"), body.get("password")
        if not isinstance(name, (str, type(None))) or not isinstance(password, (str, type(None))):
            raise BadRequest("username and password are strings")
        if not name or not password:
            raise HttpError(422, "Username and password are required")
        with self.state.lock:
            user = self.state.users.get(name)
            if user is None:
                raise HttpError(401, "user not found")
            if user["password"] != password:
                self.state.count("login_refused")
                raise HttpError(401, "invalid password")
            pair = self.state.token_pair(name)
            self.state.count("logins")
        self._ok(pair)

    def _refresh(self) -> None:
        body = self._body()
        token = body.get("refreshToken") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise HttpError(400, "refreshToken is required")
        with self.state.lock:
            name, claims = self.state.verify(token, "refresh")
            session = self.state.refresh_sessions.get(str(claims.get("jti")))
            if session is None or session["revoked"]:
                raise HttpError(401, "refresh token revoked")
            session["revoked"] = True
            pair = self.state.token_pair(name)
            self.state.count("refreshes")
        self._ok(pair)

    def _logout(self) -> None:
        body = self._body()
        token = body.get("refreshToken") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise HttpError(400, "refreshToken is required")
        with self.state.lock:
            _, claims = self.state.verify(token, "refresh")
            session = self.state.refresh_sessions.get(str(claims.get("jti")))
            if session is None:
                raise HttpError(401, "refresh token not found")
            session["revoked"] = True
            self.state.count("logouts")
        self._ok({})

    def _own_policy(self, body: Any, user: str, verb: str) -> dict:
        policy_id = body.get("policyId") if isinstance(body, dict) else None
        if not isinstance(policy_id, str) or not policy_id:
            raise HttpError(400, "Policy ID is required")
        if not re.fullmatch(r"[0-9a-f]{24}", policy_id):
            raise HttpError(500, "Internal Server Error")  # the real Manager wraps ObjectIDFromHex's error
        for policy in self.state.policies:
            if policy["id"] == policy_id and policy["creator"] == user:
                return policy
        raise HttpError(404, f"node policy not found or you don't have permission to {verb} it")

    def _create_policy(self, user: str) -> None:
        policy = node_policy(self._body(), user)
        with self.state.lock:
            if not self.state.nodes_of(policy):
                raise HttpError(404, "no nodes match the policy criteria")
            policy["id"] = os.urandom(12).hex()
            self.state.policies.append(policy)
            self.state.count("policies_created")
        self._ok()

    def _update_policy(self, user: str) -> None:
        body = self._body()
        new = node_policy(body, user)
        with self.state.lock:
            current = self._own_policy(body, user, "update")
            if not self.state.nodes_of(new):
                raise HttpError(404, "no nodes match the policy criteria")
            current.update(new)
            self.state.count("policies_updated")
        self._ok()

    def _delete_policy(self, user: str) -> None:
        body = self._body()
        with self.state.lock:
            current = self._own_policy(body, user, "delete")
            self.state.policies.remove(current)
            self.state.count("policies_deleted")
        self._ok({})

    def _self_policies(self, user: str) -> None:
        with self.state.lock:
            mine = [policy_view(p) for p in self.state.policies if p["creator"] == user]
        self._ok({"policies": mine})

    def _self_intents(self, user: str) -> None:
        with self.state.lock:
            intents = [
                {"id": p["id"][:12] + node.encode().hex()[:12].ljust(12, "0"), "policyId": p["id"], "nodeId": node,
                 "commandRegex": p["commandRegex"], "priority": p["priority"], "executionTime": p["executionTime"],
                 "state": "sent"}
                for p in self.state.policies if p["creator"] == user for node in self.state.nodes_of(p)
            ]
        self._ok({"intents": intents})

    # --- decision maker ----------------------------------------------------------------------------

    def _dm(self, method: str, path: str) -> None:
        if (method, path) == ("POST", "/api/v1/auth/token"):
            if not self._apply_fault(False):
                self._token("new")
            return
        routes = {
            ("GET", "/api/v1/scheduling/strategies"): self._dm_strategies,
            ("GET", "/api/v1/node-intents/merkle"): self._dm_merkle,
            ("POST", "/api/v1/node-intents"): self._dm_node_intents,
        }
        route = routes.get((method, path))
        if route is None:
            self._not_found(method, any(p == path for _, p in routes))
            return
        if self._bearer() is None:
            self._error(401, "Authorization header is required")
            return
        if self._apply_fault(True) or not self._authorised():
            return
        route()

    def _dm_strategies(self) -> None:
        entries = self.state.dm_resolved()
        self._reply(200, {"success": True, "message": "Scheduling intents retrieved successfully", "timestamp": _now(),
                          "scheduling": entries})

    def _dm_merkle(self) -> None:
        self._ok({"rootHash": ""})

    def _dm_node_intents(self) -> None:
        body = self._body()
        items = body.get("policies") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise BadRequest("policies must be a list")
        policies = []
        for item in items:
            if not isinstance(item, dict):
                raise BadRequest("policy is not an object")
            policies.append({"commandRegex": str(item.get("commandRegex") or ""), "priority": _go_int(item, "priority"),
                             "executionTime": _go_int(item, "executionTime")})
        with self.state.lock:
            self.state.dm_policies = policies
        self._ok({})

    # --- control ---------------------------------------------------------------------------------

    def _control(self, method: str) -> None:
        state = self.state
        if method == "POST":
            body = self._body()
            if not isinstance(body, dict):
                raise BadRequest("control body must be an object")
            with state.lock:
                if "fault" in body:
                    if body["fault"] not in (None, *FAULTS):
                        raise BadRequest(f"fault must be one of {FAULTS} or null")
                    state.fault = body["fault"]
                    state.fault_count = body.get("count")
                if "slow_seconds" in body:
                    state.slow_seconds = float(body["slow_seconds"])
                if "token_lifetime" in body:
                    state.token_lifetime = max(1, int(body["token_lifetime"]))
                if "token_shape" in body:
                    if body["token_shape"] not in ("old", "new"):
                        raise BadRequest("token_shape must be old or new")
                    state.token_shape = body["token_shape"]
                if "strategies" in body:
                    state.strategies = [normalise_strategy(s) for s in body["strategies"] or []]
                if "pods" in body:
                    state.pods = list(body["pods"] or [])
                if "users" in body:  # [{"name", "password", "role"}]
                    for user in body["users"] or []:
                        state.add_user(str(user["name"]), str(user["password"]), str(user.get("role", "admin")))
                if "nodes" in body:
                    state.nodes = [str(n) for n in body["nodes"] or []]
                if "policies" in body:  # [{... policy fields, "creator": user name}]
                    first = next(iter(state.users), "")
                    state.policies = []
                    for item in body["policies"] or []:
                        policy = node_policy(item, str(item.get("creator") or first))
                        policy["id"] = str(item.get("id") or os.urandom(12).hex())
                        state.policies.append(policy)
                if "dm_policies" in body:
                    state.dm_policies = list(body["dm_policies"] or [])
                if "dm_node" in body:
                    state.dm_node = str(body["dm_node"])
                if "dm_threads" in body:
                    state.dm_threads = bool(body["dm_threads"])
                if body.get("revoke_tokens"):  # like a password change: every token of every user is void
                    for user in state.users.values():
                        user["token_version"] += 1
                if body.get("reset_stats"):
                    state.stats = {}
        with state.lock:
            doc = {
                "mode": state.mode,
                "fault": state.fault,
                "count": state.fault_count,
                "slow_seconds": state.slow_seconds,
                "token_lifetime": state.token_lifetime,
                "token_shape": state.token_shape,
                "strategies": state.strategies,
                "pods": state.pods,
                "users": [{"name": n, "role": u["role"]} for n, u in state.users.items()],
                "nodes": state.nodes,
                "policies": copy.deepcopy(state.policies),
                "dm_node": state.dm_node,
                "stats": dict(state.stats),
            }
        self._reply(200, doc)


def make_server(host: str, port: int, state: ServerState, mode: str | None = None) -> ThreadingHTTPServer:
    """A ready (bound, not yet serving) server for ``state``, speaking ``mode`` (default: the state's)."""
    handler = type("BoundHandler", (Handler,), {"state": state, "mode": mode or state.mode})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def load_or_create_key(path: Path | None) -> rsa.RSAPrivateKey:
    """The RSA private key at ``path`` (created there, mode 0600, if missing), or a fresh one."""
    if path is not None and path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise SystemExit(f"{path} is not an RSA private key")
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if path is not None:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    return key


def _user(text: str) -> tuple[str, str, str]:
    name, _, rest = text.partition(":")
    password, _, role = rest.partition(":")
    if not name or not password or (role and role not in ROLES):
        raise argparse.ArgumentTypeError(f"give NAME:PASSWORD[:ROLE], ROLE one of {', '.join(ROLES)}")
    return name, password, role or "admin"


def main(argv: list[str] | None = None) -> int:
    """Run the server until interrupted; prints ``listening on URL`` (and ``decision maker on URL``) when ready."""
    parser = argparse.ArgumentParser(
        prog="python -m gtp5g_op.gthulhu.testserver",
        description="Gthulhu-compatible API server (legacy, v1.3 Manager or Decision Maker) with switchable "
                    "faults, for tests and local trials.",
        epilog="examples: python -m gtp5g_op.gthulhu.testserver --port 8080 --public-key-out /tmp/gthulhu.pub\n"
               "          python -m gtp5g_op.gthulhu.testserver --mode manager --port 8080 --user ops:secret "
               "--dm-port 8081 --public-key-out /tmp/dm.pub",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", choices=MODES, default="legacy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port (see the 'listening on' line)")
    parser.add_argument("--public-key-out", type=Path, help="write the server's public key PEM here")
    parser.add_argument("--private-key", type=Path, help="RSA private key PEM; created if missing (keeps the key across restarts)")
    parser.add_argument("--token-lifetime", type=int, help="seconds a token stays valid (legacy 86400, Manager access token 60)")
    parser.add_argument("--token-shape", choices=("old", "new"), default="old", help="legacy: top-level token (old) or data.token")
    parser.add_argument("--pods", type=Path, help="legacy: JSON list of pods {pod_name, labels, processes:[{pid, command}]}")
    parser.add_argument("--empty", action="store_true", help="legacy: start with no strategies instead of the default selector one")
    parser.add_argument("--user", type=_user, action="append", metavar="NAME:PASSWORD[:ROLE]",
                        help="manager: a user (repeatable; ROLE admin, reader or none; default admin:admin:admin)")
    parser.add_argument("--nodes", help="manager: comma-separated node names the cluster has (default: this host, node-a, node-b)")
    parser.add_argument("--dm-port", type=int, help="manager: also serve this node's Decision Maker on this port (0: free)")
    parser.add_argument("--dm-node", default=platform.node(), help="the Decision Maker's node (default: this host's name)")
    parser.add_argument("--dm-threads", action="store_true", help="the Decision Maker matches every thread, not only leaders")
    parser.add_argument("--fault", choices=FAULTS, help="start with this fault switched on")
    parser.add_argument("--slow-seconds", type=float, default=2.0)
    parser.add_argument("--tls-cert", type=Path, help="serve https with this certificate (PEM) ...")
    parser.add_argument("--tls-key", type=Path, help="... and this private key (PEM)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request (never headers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="gthulhu-testserver: %(message)s")

    lifetime = args.token_lifetime or (60 if args.mode == "manager" else 86400)
    state = ServerState(load_or_create_key(args.private_key), max(1, lifetime), args.token_shape, args.mode)
    if args.empty:
        state.strategies = []
    if args.pods:
        state.pods = json.loads(args.pods.read_text())
    for name, password, role in args.user or ([("admin", "admin", "admin")] if args.mode == "manager" else []):
        state.add_user(name, password, role)
    if args.nodes:
        state.nodes = [n for n in args.nodes.split(",") if n]
    state.dm_node, state.dm_threads = args.dm_node, args.dm_threads
    state.fault, state.slow_seconds = args.fault, args.slow_seconds
    if args.public_key_out:
        args.public_key_out.write_bytes(state.public_pem())
    servers = [make_server(args.host, args.port, state)]
    if args.dm_port is not None:
        if args.mode != "manager":
            parser.error("--dm-port goes with --mode manager (use --mode dm for a Decision Maker alone)")
        servers.append(make_server(args.host, args.dm_port, state, "dm"))
    scheme = "http"
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        for server in servers:
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    host, port = servers[0].server_address[:2]
    print(f"listening on {scheme}://{host}:{port}", flush=True)
    if len(servers) > 1:
        print(f"decision maker on {scheme}://{host}:{servers[1].server_address[1]}", flush=True)
        threading.Thread(target=servers[1].serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    try:
        servers[0].serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for server in servers:
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
