"""Independent Gthulhu servers for review: the legacy API, the v1.3.0 Manager and its Decision Maker.

A test double (no machine here runs Gthulhu: it needs Kubernetes), written by a reviewer from the real
sources and NOT from ``gtp5g_op.gthulhu.testserver``, so that a misreading shared by the project's
client and its own test server shows up here. Sources read (no code copied):

- legacy: Gthulhu/api v0.1.0 ``rest/routes.go`` (gorilla/mux: middlewares run only on a matched route;
  an unknown path is mux's text 404 ``404 page not found``, a known path with another method a 405
  with an empty body), ``rest/middleware.go`` (JWT check, CORS), ``rest/token_hdl.go``,
  ``rest/strategies_hdl.go`` (``scheduling`` is ``null`` while nothing was posted),
  ``service/strategies_svc.go`` (selector strategies expanded per PID, ``command_regex`` dropped);
- Manager: Gthulhu/Gthulhu v1.3.0 ``api/manager/rest/{routes,hander,middleware,auth_hdl,
  node_policy_hdl}.go``, ``service/{auth_svc,node_policy_svc}.go``, ``repository/cr_node_policy_repo.go``
  (echo v4.13.4: the ``/api`` group's middleware registers a catch-all not-found route, so inside
  ``/api`` a known path with another method is a 404 ``{"message":"Not Found"}`` too, never a 405;
  outside it the embedded web UI answers every unknown GET with its index.html);
- Decision Maker: v1.3.0 ``api/decisionmaker/rest/{handler,middleware,token_handler,intent_handler,
  node_policy_hdl}.go`` and ``service/node_policy_svc.go``.

Where the real contract leaves room, this double deliberately differs from the project's test server:
ids are real-looking ObjectIDs (time + random + counter), answers carry fields the client does not
know and keys in another order, big answers are chunked (Go does that past 2 KiB) and ``chunked=True``
chunks every answer, ``close_every`` drops keep-alive, ``latency`` slows every answer, access tokens
can be short-lived and every refresh rotates the refresh token (a reused one is ``refresh token
revoked``), and the user's other policies (other nodes, hand-written regexes, node selectors) are there.

The servers run in a thread of the test process (``serve()``), keep their state across ``restart()``
(the real Manager keeps policies in CRDs) unless told to forget it, and log every request (method,
path, whether it carried a token, the JSON body) in ``state.requests`` so a test can prove that
nothing was written. ``python tests/independent_gthulhu.py --mode manager`` runs one by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SPA_HTML = b'<!doctype html><html lang="en"><head><title>Gthulhu</title></head><body><div id="root"></div></body></html>'
ECHO_404 = {"message": "Not Found"}
ECHO_405 = {"message": "Method Not Allowed"}


def _rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


_oid_lock = threading.Lock()
_oid_counter = int.from_bytes(os.urandom(3), "big")
_oid_process = os.urandom(5)


def object_id() -> str:
    """A MongoDB ObjectID in hex: 4 bytes of time, 5 random bytes per process, a 3-byte counter."""
    global _oid_counter
    with _oid_lock:
        _oid_counter = (_oid_counter + 1) & 0xFFFFFF
        counter = _oid_counter
    return (int(time.time()).to_bytes(4, "big") + _oid_process + counter.to_bytes(3, "big")).hex()


# --- Go's encoding/json, as far as these handlers need it ------------------------------------------


class GoDecodeError(ValueError):
    """What json.Decoder.Decode returns for the body (syntax error, EOF, type mismatch)."""


def go_decode(raw: bytes, fields: dict[str, str]) -> dict[str, Any]:
    """Decode the first JSON value of ``raw`` into a struct of ``fields`` (name → Go type) like Go does.

    Trailing data is ignored (Decoder reads one value), unknown keys are ignored, keys match
    case-insensitively with an exact match preferred, ``null`` leaves the zero value, and a value of
    the wrong JSON type is an error. Types: string, int, bool, []string, []selector, []dra.
    """
    text = raw.decode("utf-8", "replace").lstrip(" \t\r\n")
    if not text:
        raise GoDecodeError("EOF")
    try:
        doc, _ = json.JSONDecoder().raw_decode(text)
    except ValueError as exc:
        raise GoDecodeError(f"invalid character: {exc}") from None
    out: dict[str, Any] = {name: _zero(kind) for name, kind in fields.items()}
    if doc is None:
        return out
    if not isinstance(doc, dict):
        raise GoDecodeError(f"json: cannot unmarshal {type(doc).__name__} into Go value of type struct")
    folded = {name.lower(): name for name in fields}
    for key, value in doc.items():
        name = key if key in fields else folded.get(key.lower())
        if name is None or value is None:
            continue
        out[name] = _convert(value, fields[name], name)
    return out


def _zero(kind: str) -> Any:
    return {"string": "", "int": 0, "bool": False}.get(kind, [])


def _convert(value: Any, kind: str, name: str) -> Any:
    bad = GoDecodeError(f"json: cannot unmarshal {type(value).__name__} into Go struct field .{name} of type {kind}")
    if kind == "string":
        if not isinstance(value, str):
            raise bad
        return value
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**63:
            raise bad
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if not isinstance(value, list):
        raise bad
    if kind == "[]string":
        if not all(isinstance(v, str) for v in value):
            raise bad
        return list(value)
    if kind == "[]selector":
        out = []
        for item in value:
            if item is None:
                out.append({"key": "", "value": ""})
                continue
            if not isinstance(item, dict):
                raise bad
            sel = go_decode(json.dumps(item).encode(), {"key": "string", "value": "string"})
            out.append(sel)
        return out
    if kind == "[]dra":
        out = []
        for item in value:
            if not isinstance(item, dict):
                raise bad
            out.append(go_decode(json.dumps(item).encode(), {"deviceClass": "string", "attributes": "[]selector"}))
        return out
    raise AssertionError(kind)


def go_encode(doc: Any) -> bytes:
    """json.NewEncoder(w).Encode(doc): HTML characters escaped, a newline at the end."""
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") + "\n").encode()


# --- the state of a server (kept across restarts) ---------------------------------------------------


@dataclass
class User:
    name: str
    password: str
    uid: str = field(default_factory=object_id)
    roles: tuple[str, ...] = ("admin",)
    status: int = 1  # 1 active, 2 inactive, 3 must change password (UserStatus in account.go)
    token_version: int = 0
    sessions: dict[str, dict] = field(default_factory=dict)  # jti → {"hash", "revoked", "exp"}


ROLE_PERMISSIONS = {
    "admin": {"node_scheduling_policy.create", "node_scheduling_policy.read", "node_scheduling_policy.update",
              "node_scheduling_policy.delete", "node_scheduling_intent.read", "node_scheduling_intent.delete"},
    "policy-reader": {"node_scheduling_policy.read"},
}


@dataclass
class Request:
    method: str
    path: str
    authorized: bool
    body: Any
    status: int = 0  # the answer's


class State:
    """Users, policies, legacy strategies and the request log of one server (and its Decision Maker)."""

    def __init__(self, nodes: tuple[str, ...] = ("node-a", "node-b")):
        self.lock = threading.RLock()
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.nodes = list(nodes)
        self.users: dict[str, User] = {}
        self.policies: dict[str, dict] = {}  # id → stored policy (with creatorID)
        self.access_ttl = 60  # seconds: genAccessToken's one minute
        self.refresh_ttl = 24 * 3600
        self.legacy_ttl = 24 * 3600  # seconds (the real server's token_duration is in hours)
        self.legacy_posted: list[dict] | None = None  # nil until the first POST
        self.legacy_pods = [
            {"labels": {"app": "ueransim-macvlan"}, "processes": [{"pid": 4242, "command": "nr-gnb"}]},
            {"labels": {"app": "web"}, "processes": [{"pid": 777, "command": "nginx"}]},
        ]
        self.dm_node = "node-a"
        self.dm_extra: list[dict] = []  # pod-level entries the DM also reports
        self.requests: list[Request] = []
        self.fail_create_after_insert = 0  # the next N creates store the policy, then answer 500 (DM push failed)

    # --- legacy / DM keys ---
    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    # --- Manager users ---
    def add_user(self, name: str, password: str, roles: tuple[str, ...] = ("admin",), status: int = 1) -> User:
        with self.lock:
            user = User(name, password, roles=roles, status=status)
            self.users[name] = user
            return user

    def user(self, name: str) -> User:
        return self.users[name]

    def policies_of(self, name: str) -> list[dict]:
        uid = self.users[name].uid
        with self.lock:
            return [dict(p) for _, p in sorted(self.policies.items()) if p["creatorID"] == uid]

    def add_policy(self, owner: str, **spec: Any) -> str:
        """Store a policy as if ``owner`` had created it (for other users' and hand-made policies)."""
        pid = object_id()
        with self.lock:
            self.policies[pid] = {"nodeSelectors": [], "nodeNames": [], "draSelectors": [], "commandRegex": "",
                                  "priority": 0, "executionTime": 0, **spec, "creatorID": self.users[owner].uid}
        return pid

    def writes(self) -> list[Request]:
        """Requests that could change something (everything but GET and the auth calls)."""
        return [r for r in self.requests if r.method not in ("GET", "HEAD", "OPTIONS") and "/auth/" not in r.path]

    def sign(self, claims: dict) -> str:
        return jwt.encode(claims, self.key, algorithm="RS256")


def nodes_of(state: State, spec: dict) -> list[str]:
    """resolveNodesForPolicy: the AND of the non-empty selector kinds; no selector at all matches nothing."""
    if not (spec["nodeSelectors"] or spec["nodeNames"] or spec["draSelectors"]):
        return []
    # nodes here carry the labels kubernetes.io/hostname=<name> and gthulhu.io/role=upf; no DRA devices
    labels = {n: {"kubernetes.io/hostname": n, "gthulhu.io/role": "upf"} for n in state.nodes}
    nodes = [n for n in state.nodes if (not spec["nodeNames"] or n in spec["nodeNames"])
             and all(labels[n].get(s["key"]) == s["value"] for s in spec["nodeSelectors"])]
    return [] if spec["draSelectors"] else nodes


# --- the HTTP plumbing ---------------------------------------------------------------------------------


class GoishHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with Go net/http's habits: Content-Length for small bodies, chunked past 2 KiB."""

    protocol_version = "HTTP/1.1"
    server_version = ""
    sys_version = ""
    state: State
    options: dict

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.state.lock:
            self.server.conns.add(self.connection)  # type: ignore[attr-defined]

    def finish(self) -> None:
        with self.state.lock:
            self.server.conns.discard(self.connection)  # type: ignore[attr-defined]
        super().finish()

    def version_string(self) -> str:
        return ""

    def send(self, status: int, body: bytes, content_type: str | None = "application/json",
             headers: dict[str, str] | None = None) -> None:
        if self.options.get("latency"):
            time.sleep(self.options["latency"])
        if getattr(self, "record", None) is not None:
            self.record.status = status
        self._served = getattr(self.server, "served", 0) + 1
        self.server.served = self._served  # type: ignore[attr-defined]
        close = bool(self.options.get("close_every")) and self._served % self.options["close_every"] == 0
        chunked = self.options.get("chunked") or len(body) > 2048
        self.send_response_only(status)
        self.send_header("Date", self.date_time_string())
        if content_type:
            self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        if chunked and self.command != "HEAD":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = max(1, len(body) // 2)
            for part in (body[:half], body[half:]):
                if part:
                    self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    def json(self, status: int, doc: Any, content_type: str = "application/json") -> None:
        self.send(status, go_encode(doc), content_type)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def handle_one(self) -> None:
        self.raw = self._read_body()
        path = self.path.split("?", 1)[0]
        try:
            body = json.loads(self.raw) if self.raw else None
        except ValueError:
            body = self.raw[:200]
        self.record = Request(self.command, path, "Authorization" in self.headers, body)
        with self.state.lock:
            self.state.requests.append(self.record)
        try:
            self.route(self.command, path)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def route(self, method: str, path: str) -> None:
        raise NotImplementedError

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = lambda self: self.handle_one()  # noqa: E731


# --- legacy: Gthulhu/api v0.1.0 (gorilla/mux) ---------------------------------------------------------


class LegacyHandler(GoishHandler):
    """Routes of v0.1.0's routes.go; middlewares (logging, CORS, JWT) wrap only matched routes."""

    ROUTES = {
        "/api/v1/auth/token": ("POST", "OPTIONS"),
        "/api/v1/metrics": ("POST", "GET", "OPTIONS"),
        "/api/v1/pods/pids": ("GET", "OPTIONS"),
        "/api/v1/scheduling/strategies": ("GET", "POST", "OPTIONS"),
        "/health": ("GET",),
        "/": ("GET",),
    }

    def route(self, method: str, path: str) -> None:
        allowed = self.ROUTES.get(path)
        if path.startswith("/static/") and method == "GET":  # http.FileServer of a few files
            self.send(404, b"404 page not found\n", "text/plain; charset=utf-8", {"X-Content-Type-Options": "nosniff"})
            return
        if allowed is None:
            if self.options.get("echo_404"):  # not gorilla's: a double whose 404 looks like echo's
                self.json(404, ECHO_404)
                return
            self.send(404, b"404 page not found\n", "text/plain; charset=utf-8",
                      {"X-Content-Type-Options": "nosniff"})
            return
        if allowed is not None and method not in allowed:
            self.send(405, b"", None)  # mux's methodNotAllowedHandler: status only
            return
        cors = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
                "Access-Control-Allow-Headers": "Content-Type, Authorization, X-Request-ID"}
        if method == "OPTIONS":
            self.send(200, b"", None, cors)
            return
        if path not in ("/health", "/", "/api/v1/auth/token") and not path.startswith("/static/"):
            problem = self._jwt_problem()
            if problem:
                self.json(401, {"success": False, "error": problem})
                return
        if path == "/health":
            self.json(200, {"service": "BSS Metrics API Server", "status": "healthy", "timestamp": _rfc3339()})
        elif path == "/":
            self.json(200, {"endpoints": "/api/v1/auth/token (POST), ...", "message": "BSS Metrics API Server",
                            "version": "1.0.0"})
        elif path == "/api/v1/auth/token":
            self._token()
        elif path == "/api/v1/scheduling/strategies" and method == "GET":
            self._get()
        elif path == "/api/v1/scheduling/strategies":
            self._post()
        else:
            self.json(200, {"success": True, "message": "ok", "timestamp": _rfc3339()})

    def _jwt_problem(self) -> str | None:
        header = self.headers.get("Authorization", "")
        if not header:
            return "Authorization header is required"
        if not header.startswith("Bearer "):
            return "Authorization header must start with 'Bearer '"
        try:
            jwt.decode(header[7:], self.state.key.public_key(), algorithms=["RS256"])
        except jwt.ExpiredSignatureError:
            return "Invalid or expired token: token has invalid claims: token is expired"
        except jwt.InvalidTokenError as exc:
            return f"Invalid or expired token: token is malformed: {type(exc).__name__}"
        return None

    def _token(self) -> None:
        try:
            req = go_decode(self.raw, {"public_key": "string"})
        except GoDecodeError as exc:
            self.json(400, {"success": False, "error": f"Invalid JSON format: {exc}"})
            return
        try:
            given = serialization.load_pem_public_key(req["public_key"].encode())
            ok = isinstance(given, rsa.RSAPublicKey) and given.public_numbers() == self.state.key.public_key().public_numbers()
            why = "public key does not match server's private key"
        except ValueError:
            ok, why = False, "failed to decode PEM block containing public key"
        if not ok:
            self.json(401, {"success": False, "error": f"Public key verification failed: public key verification failed: {why}"})
            return
        now = int(time.time())
        client = f"client_{now}"
        token = self.state.sign({"client_id": client, "iss": "bss-api-server", "sub": client, "exp": now + self.state.legacy_ttl,
                                 "nbf": now, "iat": now})
        self.json(200, {"success": True, "message": "Token generated successfully", "timestamp": _rfc3339(), "token": token})

    def _get(self) -> None:
        with self.state.lock:
            posted = self.state.legacy_posted
            final: list[dict] | None = None
            for s in posted or []:
                if s.get("selectors"):
                    regex = re.compile(s.get("command_regex") or ".*")
                    for pod in self.state.legacy_pods:
                        if all(pod["labels"].get(x["key"]) == x["value"] for x in s["selectors"]):
                            for proc in pod["processes"]:
                                if regex.search(proc["command"]):
                                    final = (final or []) + [{"priority": s["priority"], "execution_time": s["execution_time"],
                                                              "pid": proc["pid"], "selectors": s["selectors"]}]
                elif s.get("pid"):
                    final = (final or []) + [s]
        self.send(200, go_encode({"success": True, "message": "Scheduling strategies retrieved from cache",
                                  "timestamp": _rfc3339(), "scheduling": final}), "application/json",
                  {"X-Cache-Hit": "true", "X-Cache-Stats": "hits=1,misses=1,hit_rate=0.5"})

    def _post(self) -> None:
        try:
            doc = json.JSONDecoder().raw_decode(self.raw.decode().lstrip())[0] if self.raw.strip() else None
            items = doc.get("strategies") if isinstance(doc, dict) else None
            strategies = []
            for item in items or []:
                s = go_decode(json.dumps(item).encode(), {"priority": "bool", "execution_time": "int", "pid": "int",
                                                          "selectors": "[]selector", "command_regex": "string"})
                if s["execution_time"] < 0:
                    raise GoDecodeError("json: cannot unmarshal number -1 into Go struct field of type uint64")
                out = {"priority": s["priority"], "execution_time": s["execution_time"]}
                if s["pid"]:
                    out["pid"] = s["pid"]
                if s["selectors"]:
                    out["selectors"] = s["selectors"]
                if s["command_regex"]:
                    out["command_regex"] = s["command_regex"]
                strategies.append(out)
            if not self.raw.strip():
                raise GoDecodeError("EOF")
        except (GoDecodeError, ValueError, AttributeError) as exc:
            self.json(400, {"success": False, "error": f"Invalid request payload: {exc}"})
            return
        with self.state.lock:
            self.state.legacy_posted = strategies
        self.json(200, {"success": True, "message": "Scheduling strategies saved successfully", "timestamp": _rfc3339()})


# --- v1.x: echo v4 servers -------------------------------------------------------------------------------


class EchoHandler(GoishHandler):
    """echo's routing: exact routes, the /api group's catch-all 404, 405 with Allow outside it."""

    routes: dict[str, dict[str, Any]] = {}  # path → {method: callable name}
    web_ui = False  # the Manager image embeds the web UI: GET /* falls back to index.html

    def route(self, method: str, path: str) -> None:
        methods = self.routes.get(path)
        if self.options.get("before_v1_3") and "node-" in path:
            methods = None  # a v1.0 .. v1.2 Decision Maker: no node-level routes yet
        if methods and method in methods:
            getattr(self, methods[method])()
            return
        if path == "/api" or path.startswith("/api/"):
            self.json(404, ECHO_404, "application/json; charset=UTF-8")  # group RouteNotFound wins over 405
            return
        if method == "GET" and self.web_ui:
            self.send(200, SPA_HTML, "text/html; charset=utf-8")
            return
        if methods:
            self.send(405, go_encode(ECHO_405), "application/json; charset=UTF-8", {"Allow": ", ".join(sorted(methods))})
            return
        self.json(404, ECHO_404, "application/json; charset=UTF-8")

    def error(self, status: int, message: str) -> None:
        self.json(status, {"success": False, "error": message})

    def ok(self, data: Any = None) -> None:
        doc: dict[str, Any] = {"success": True}
        if data is not None:
            doc["data"] = data
        doc["timestamp"] = _rfc3339()
        self.json(200, doc)

    def health(self) -> None:
        self.json(200, {"status": "healthy", "timestamp": _rfc3339(), "service": "BSS Metrics API Server"})

    def version(self) -> None:
        self.json(200, {"message": "BSS Metrics API Server", "version": "1.0.0", "endpoints": self.endpoints})

    endpoints = ""


class ManagerHandler(EchoHandler):
    """The v1.3.0 Manager: login, refresh, logout, RBAC and node scheduling policies."""

    web_ui = True
    endpoints = "/api/v1/auth/token (POST), /api/v1/metrics (POST), /api/v1/pods/pids (GET), /health (GET)"
    P = "/api/v1/node-scheduling-policies"
    routes = {
        "/health": {"GET": "health"},
        "/version": {"GET": "version"},
        "/api/v1/auth/login": {"POST": "login"},
        "/api/v1/auth/refresh": {"POST": "refresh"},
        "/api/v1/auth/logout": {"POST": "logout"},
        "/api/v1/auth/validate": {"GET": "validate"},
        P: {"POST": "create", "PUT": "update", "DELETE": "delete"},
        P + "/self": {"GET": "list_self"},
        "/api/v1/node-scheduling-intents/self": {"GET": "intents_self"},
        "/api/v1/strategies": {"POST": "unsupported", "PUT": "unsupported", "DELETE": "unsupported"},
        "/api/v1/strategies/self": {"GET": "unsupported"},
    }

    # --- tokens (auth_svc.go) ---
    def _issue(self, user: User) -> dict:
        now = int(time.time())
        common = {"uid": user.uid, "needChangePassword": user.status == 3, "tokenVersion": user.token_version,
                  "iss": "bss-api-server", "sub": user.uid, "iat": now, "nbf": now}
        if self.options.get("no_iat"):  # a variant whose tokens carry exp only
            del common["iat"], common["nbf"]
        access = self.state.sign({**common, "tokenType": "access", "exp": now + self.state.access_ttl})
        jti = os.urandom(10).hex()
        refresh = self.state.sign({**common, "tokenType": "refresh", "exp": now + self.state.refresh_ttl, "jti": jti})
        user.sessions = {k: v for k, v in user.sessions.items() if not v["revoked"] and v["exp"] > now}
        user.sessions[jti] = {"token": refresh, "revoked": False, "exp": now + self.state.refresh_ttl}
        return {"token": access, "accessToken": access, "refreshToken": refresh}

    def _claims(self, token: str) -> dict | tuple[int, str]:
        try:
            return jwt.decode(token, self.state.key.public_key(), algorithms=["RS256"])
        except jwt.InvalidTokenError:
            return 401, "invalid or expired token"

    def _user_by_uid(self, uid: Any) -> User | None:
        return next((u for u in self.state.users.values() if u.uid == uid), None)

    def _auth(self, permission: str) -> User | None:
        """GetAuthMiddleware + VerifyJWTToken; answers the error itself and returns None."""
        header = self.headers.get("Authorization", "")
        if header == "":
            self.error(401, "Missing Authorization header")
            return None
        if len(header) <= 7 or not header.startswith("Bearer "):
            self.error(401, "Invalid Authorization header format")
            return None
        with self.state.lock:
            claims = self._claims(header[7:])
            if isinstance(claims, tuple):
                self.error(*claims)
                return None
            if claims.get("tokenType") != "access":
                self.error(401, "invalid token type")
                return None
            if permission != "user.password.change" and claims.get("needChangePassword"):
                self.error(403, "password change required")
                return None
            user = self._user_by_uid(claims.get("uid"))
            if user is None:
                self.error(401, "user not found")
                return None
            if user.token_version != claims.get("tokenVersion"):
                self.error(401, "token revoked")
                return None
            if permission and not any(permission in ROLE_PERMISSIONS.get(r, ()) for r in user.roles):
                self.error(403, "permission denied")
                return None
            return user

    def login(self) -> None:
        try:
            req = go_decode(self.raw, {"username": "string", "password": "string"})
        except GoDecodeError:
            self.error(400, "Invalid request body")
            return
        if req["username"] == "" or req["password"] == "":
            self.error(422, "Username and password are required")
            return
        with self.state.lock:
            user = self.state.users.get(req["username"])
            if user is None:
                self.error(401, "user not found")
                return
            if user.status == 2:
                self.error(401, "user is inactive")
                return
            if user.password != req["password"]:
                self.error(401, "invalid password")
                return
            pair = self._issue(user)
        self.ok(pair)

    def _refresh_session(self, token: str, revoke: bool) -> User | None:
        claims = self._claims(token)
        if isinstance(claims, tuple):
            self.error(*claims)
            return None
        if claims.get("tokenType") != "refresh" or not claims.get("jti"):
            self.error(401, "invalid refresh token")
            return None
        user = self._user_by_uid(claims.get("uid"))
        if user is None:
            self.error(401, "user not found")
            return None
        if revoke and user.token_version != claims.get("tokenVersion"):
            self.error(401, "refresh token revoked")
            return None
        session = user.sessions.get(claims["jti"])
        if session is None:
            self.error(401, "refresh token not found")
            return None
        if revoke and (session["revoked"] or session["exp"] <= time.time() or session["token"] != token):
            self.error(401, "refresh token revoked")
            return None
        session["revoked"] = True
        return user

    def refresh(self) -> None:
        try:
            req = go_decode(self.raw, {"refreshToken": "string"})
        except GoDecodeError:
            self.error(400, "Invalid request body")
            return
        if not req["refreshToken"]:
            self.error(400, "refreshToken is required")
            return
        with self.state.lock:
            if self.options.get("no_rotation"):  # a variant that keeps the refresh token: access token only
                claims = self._claims(req["refreshToken"])
                user = None if isinstance(claims, tuple) else self._user_by_uid(claims.get("uid"))
                if user is None or claims.get("tokenType") != "refresh":
                    self.error(401, "invalid refresh token")
                    return
                access = self._issue(user)["accessToken"]
                self.ok({"accessToken": access})
                return
            user = self._refresh_session(req["refreshToken"], revoke=True)
            if user is None:
                return
            pair = self._issue(user)
        self.ok(pair)

    def logout(self) -> None:
        try:
            req = go_decode(self.raw, {"refreshToken": "string"})
        except GoDecodeError:
            self.error(400, "Invalid request body")
            return
        if not req["refreshToken"]:
            self.error(400, "refreshToken is required")
            return
        with self.state.lock:
            if self._refresh_session(req["refreshToken"], revoke=False) is None:
                return
        self.ok()

    def validate(self) -> None:
        user = self._auth("")
        if user is not None:
            self.ok({"valid": True, "uid": user.uid, "needChangePassword": user.status == 3})

    def unsupported(self) -> None:
        if self._auth("schedule_strategy.read") is not None:
            self.error(500, "Internal Server Error")

    # --- node scheduling policies (node_policy_hdl.go, node_policy_svc.go) ---
    FIELDS = {"nodeSelectors": "[]selector", "nodeNames": "[]string", "draSelectors": "[]dra",
              "commandRegex": "string", "priority": "int", "executionTime": "int"}

    def _nodes(self, spec: dict) -> list[str]:
        return nodes_of(self.state, spec)

    def _spec(self, fields: dict) -> dict | None:
        try:
            return go_decode(self.raw, fields)
        except GoDecodeError:
            self.error(400, "Invalid request body")
            return None

    def create(self) -> None:
        user = self._auth("node_scheduling_policy.create")
        if user is None:
            return
        spec = self._spec(self.FIELDS)
        if spec is None:
            return
        with self.state.lock:
            if not self._nodes(spec):
                self.error(404, "no nodes match the policy criteria")
                return
            self.state.policies[object_id()] = {**spec, "creatorID": user.uid, "createdTime": int(time.time() * 1000)}
            if self.state.fail_create_after_insert > 0:
                self.state.fail_create_after_insert -= 1
                self.error(500, "Internal Server Error")
                return
        self.ok()

    def _owned(self, user: User, policy_id: str, verb: str) -> dict | None:
        if not re.fullmatch(r"[0-9a-fA-F]{24}", policy_id):
            self.error(500, "Internal Server Error")  # ObjectIDFromHex's error is not an HTTPStatusError
            return None
        policy = self.state.policies.get(policy_id.lower())
        if policy is None or policy["creatorID"] != user.uid:
            self.error(404, f"node policy not found or you don't have permission to {verb} it")
            return None
        return policy

    def update(self) -> None:
        user = self._auth("node_scheduling_policy.update")
        if user is None:
            return
        spec = self._spec({"policyId": "string", **self.FIELDS})
        if spec is None:
            return
        if not spec["policyId"]:
            self.error(400, "Policy ID is required")
            return
        with self.state.lock:
            current = self._owned(user, spec["policyId"], "update")
            if current is None:
                return
            if not self._nodes(spec):
                self.error(404, "no nodes match the policy criteria")
                return
            new = {k: spec[k] for k in self.FIELDS}  # a full replace: what the PUT leaves out is gone
            self.state.policies[spec["policyId"].lower()] = {**new, "creatorID": current["creatorID"],
                                                              "createdTime": current.get("createdTime", 0)}
        self.ok()

    def delete(self) -> None:
        user = self._auth("node_scheduling_policy.delete")
        if user is None:
            return
        spec = self._spec({"policyId": "string"})
        if spec is None:
            return
        if not spec["policyId"]:
            self.error(400, "Policy ID is required")
            return
        with self.state.lock:
            if self._owned(user, spec["policyId"], "delete") is None:
                return
            del self.state.policies[spec["policyId"].lower()]
        self.ok({})

    def _view(self, pid: str, p: dict) -> dict:
        """One policy as /self answers it: omitempty fields left out; extra fields a newer Manager may add."""
        out: dict[str, Any] = {}
        for key in ("executionTime", "priority", "commandRegex", "draSelectors", "nodeNames", "nodeSelectors"):
            if p.get(key):
                out[key] = p[key]
        out["creatorID"] = p["creatorID"]  # not in v1.3.0's answer: a field the client does not know
        out["createdTime"] = p.get("createdTime", 0)
        out["id"] = pid
        return out

    def list_self(self) -> None:
        user = self._auth("node_scheduling_policy.read")
        if user is None:
            return
        with self.state.lock:
            mine = [self._view(pid, p) for pid, p in sorted(self.state.policies.items()) if p["creatorID"] == user.uid]
        self.ok({"policies": mine})

    def intents_self(self) -> None:
        user = self._auth("node_scheduling_intent.read")
        if user is None:
            return
        with self.state.lock:
            intents = [{"id": object_id(), "policyId": pid, "nodeId": n, "commandRegex": p["commandRegex"],
                        "priority": p["priority"], "executionTime": p["executionTime"], "state": 2}
                       for pid, p in sorted(self.state.policies.items()) if p["creatorID"] == user.uid
                       for n in self._nodes(p)]
        self.ok({"intents": intents})


class DecisionMakerHandler(EchoHandler):
    """A v1.3.0 Decision Maker: public-key token, the resolved strategies of its node."""

    endpoints = "/health, /version, POST_/api/v1/intents, GET_/api/v1/scheduling/strategies"
    routes = {
        "/health": {"GET": "health"},
        "/version": {"GET": "version"},
        "/api/v1/auth/token": {"POST": "token"},
        "/api/v1/scheduling/strategies": {"GET": "strategies"},
        "/api/v1/intents": {"POST": "needs_token", "DELETE": "needs_token"},
        "/api/v1/intents/merkle": {"GET": "needs_token"},
        "/api/v1/node-intents": {"POST": "needs_token", "DELETE": "needs_token"},
        "/api/v1/node-intents/merkle": {"GET": "needs_token"},
        "/api/v1/pods/pids": {"GET": "needs_token"},
        "/metrics": {"GET": "metrics"},
    }

    def metrics(self) -> None:
        self.send(200, b"# HELP go_goroutines Number of goroutines.\n# TYPE go_goroutines gauge\ngo_goroutines 12\n",
                  "text/plain; version=0.0.4; charset=utf-8")

    def _jwt_ok(self) -> bool:
        header = self.headers.get("Authorization", "")
        if not header:
            self.error(401, "Authorization header is required")
            return False
        if not header.startswith("Bearer "):
            self.error(401, "Authorization header must start with 'Bearer '")
            return False
        try:
            jwt.decode(header[7:], self.state.key.public_key(), algorithms=["RS256"])
        except jwt.InvalidTokenError as exc:
            self.error(401, f"Invalid or expired token: {type(exc).__name__}")
            return False
        return True

    def needs_token(self) -> None:
        if self._jwt_ok():
            self.ok({"rootHash": ""})

    def token(self) -> None:
        try:
            req = go_decode(self.raw, {"public_key": "string", "client_id": "string", "expired_at": "int"})
        except GoDecodeError:
            self.error(400, "Invalid request payload")
            return
        try:
            given = serialization.load_pem_public_key(req["public_key"].encode())
            ok = isinstance(given, rsa.RSAPublicKey) and given.public_numbers() == self.state.key.public_key().public_numbers()
        except ValueError:
            ok = False
        if not ok:
            self.error(401, "Public key verification failed ")
            return
        now = int(time.time())
        exp = now + 24 * 3600
        token = self.state.sign({"client_id": req["client_id"], "iss": "decision-maker-service", "sub": req["client_id"],
                                 "exp": exp, "iat": now, "nbf": now})
        self.ok({"token": token, "expired_at": exp})

    def strategies(self) -> None:
        if not self._jwt_ok():
            return
        with self.state.lock:
            policies = [p for p in self.state.policies.values()
                        if self.state.dm_node in nodes_of(self.state, p)]
            extra = list(self.state.dm_extra)
        entries = list(extra)
        procs = {}
        for comm_path in Path("/proc").glob("[0-9]*/comm"):  # thread-group leaders only, as in v1.3.0
            try:
                procs[int(comm_path.parent.name)] = comm_path.read_text().rstrip("\n")
            except (OSError, ValueError):
                continue
        for policy in policies:
            if not policy["commandRegex"]:
                continue
            try:
                regex = re.compile(policy["commandRegex"])
            except re.error:
                continue
            for pid, comm in procs.items():
                if comm != "pause" and regex.search(comm):
                    entries.append({"priority": policy["priority"], "execution_time": policy["executionTime"], "pid": pid,
                                    "command_regex": policy["commandRegex"]})
        self.json(200, {"success": True, "message": "Scheduling intents retrieved successfully", "timestamp": _rfc3339(),
                        "scheduling": entries})


# --- running them -----------------------------------------------------------------------------------------


HANDLERS = {"legacy": LegacyHandler, "manager": ManagerHandler, "dm": DecisionMakerHandler}


class Server:
    """One server of ``kind`` in a thread on 127.0.0.1; ``restart()`` keeps the port (and the state)."""

    def __init__(self, kind: str, state: State | None = None, port: int = 0, **options: Any):
        self.kind = kind
        self.state = state or State()
        self.options = options
        self.port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self) -> Server:
        handler = type(f"Bound{self.kind}", (HANDLERS[self.kind],), {"state": self.state, "options": self.options})
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        httpd.daemon_threads = True
        httpd.conns = set()  # type: ignore[attr-defined]
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop like a killed process: the listener and every open (keep-alive) connection close."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            with self.state.lock:
                conns = list(self._httpd.conns)  # type: ignore[attr-defined]
            for conn in conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._httpd = None

    def restart(self, down_for: float = 0.0, forget: bool = False) -> None:
        """Stop, stay down (connections refused) ``down_for`` seconds, come back on the same port."""
        self.stop()
        if forget:
            with self.state.lock:
                self.state.policies.clear()
                self.state.legacy_posted = None
        time.sleep(down_for)
        for _ in range(50):
            try:
                self.serve()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"cannot bind 127.0.0.1:{self.port} again")

    def __enter__(self) -> Server:
        return self.serve()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(HANDLERS), default="manager")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--user", default="admin:admin")
    parser.add_argument("--public-key-out", type=Path)
    args = parser.parse_args()
    server = Server(args.mode, port=args.port)
    name, _, password = args.user.partition(":")
    server.state.add_user(name, password)
    if args.public_key_out:
        args.public_key_out.write_bytes(server.state.public_pem())
    server.serve()
    print(f"listening on {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
