"""A Gthulhu-compatible API server with switchable faults: a test double, since this machine has no Gthulhu.

It speaks the API described in docs/api.md (token from the public key, RS256 JWTs with a configurable
lifetime in seconds, both token answer shapes, POST replaces the whole set, GET expands selector
strategies into per-PID entries) over real HTTP on 127.0.0.1. There is no Kubernetes here, so the pods
that selectors match come from a static list (``--pods FILE`` or the control endpoint) instead of
the kubelet; like the real server, the expanded entries keep ``selectors`` but lose ``command_regex``,
and a selector strategy that matches no process does not appear in GET at all.

Faults are switched at run time with ``POST /_control`` (no token; bind to 127.0.0.1 only):
``{"fault": "500"|"slow"|"401"|"401-next"|"bad-json"|"down"|"foreign-token"|null, "slow_seconds": 2,
"count": 3}``; ``count`` ends the fault after that many API requests. ``401`` refuses every token-carrying call
(tokens are still issued), ``401-next`` only the next one. ``down`` drops the connection
without an answer (stop the process for refused connections); ``foreign-token`` hands out a token
signed by another key (a server that is not the one the public key belongs to). ``GET /_control`` shows the state, the raw
posted set and request counters.

The standard library's ThreadingHTTPServer is enough for a local test double (one thread per
connection, keep-alive with HTTP/1.1) and adds no dependency; it is not meant to face a network.

Usage::

    python -m gtp5g_op.gthulhu.testserver --port 8080 --public-key-out /tmp/gthulhu.pub
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gtp5g_op.config import DEFAULT_KNOWN_SELECTORS

log = logging.getLogger(__name__)

FAULTS = ("500", "slow", "401", "401-next", "bad-json", "down", "foreign-token")
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


class ServerState:
    """Everything the handler reads or changes, behind one lock."""

    def __init__(self, private_key: rsa.RSAPrivateKey, token_lifetime: int = 86400, token_shape: str = "old"):
        self.lock = threading.RLock()
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
        claims = {"client_id": client_id, "iss": "bss-api-server", "sub": client_id, "iat": now, "nbf": now, "exp": exp}
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if foreign else self.private_key
        return jwt.encode(claims, key, algorithm="RS256"), exp

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


class Handler(BaseHTTPRequestHandler):
    """Routes of the Gthulhu API plus ``/_control``."""

    protocol_version = "HTTP/1.1"
    server_version = "gthulhu-testserver"
    state: ServerState  # set on the subclass made by make_server
    foreign_token = False  # set per request by the foreign-token fault

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # --- helpers ---------------------------------------------------------------------------------

    def _reply(self, status: int, doc: Any = None, raw: bytes | None = None) -> None:
        body = raw if raw is not None else json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, {"success": False, "error": message})

    def _body(self) -> Any:
        try:
            return json.loads(self._raw or b"null")
        except ValueError as exc:
            raise BadRequest(f"invalid JSON: {exc}") from None

    def _authorised(self) -> bool:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            self._error(401, "Authorization header missing or not a Bearer token")
            return False
        try:
            jwt.decode(header[7:], self.state.public_key, algorithms=["RS256"], issuer="bss-api-server")
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
                return
            if path in ("/health", "/"):
                if not self._apply_fault(False):
                    self._reply(200, {"status": "healthy", "timestamp": _now(), "service": "gthulhu-testserver"})
                return
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
                self._error(404, f"no route {method} {path}")
                return
            if self._apply_fault(True) or not self._authorised():
                return
            route()
        except BadRequest as exc:
            self._error(400, f"Invalid request payload: {exc}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # --- routes ----------------------------------------------------------------------------------

    def _token(self) -> None:
        body = self._body()
        pem = body.get("public_key") if isinstance(body, dict) else None
        if not isinstance(pem, str):
            raise BadRequest("public_key missing")
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
            shape = self.state.token_shape
        if shape == "new":
            self._reply(200, {"success": True, "data": {"token": token, "expired_at": exp}, "timestamp": _now()})
        else:
            self._reply(200, {"success": True, "message": "Token generated successfully", "timestamp": _now(), "token": token})

    def _get_strategies(self) -> None:
        with self.state.lock:
            resolved = self.state.resolved()
        self._reply(200, {"success": True, "message": "Scheduling strategies retrieved", "timestamp": _now(), "scheduling": resolved})

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
                if body.get("reset_stats"):
                    state.stats = {}
        with state.lock:
            doc = {
                "fault": state.fault,
                "count": state.fault_count,
                "slow_seconds": state.slow_seconds,
                "token_lifetime": state.token_lifetime,
                "token_shape": state.token_shape,
                "strategies": state.strategies,
                "pods": state.pods,
                "stats": dict(state.stats),
            }
        self._reply(200, doc)


def make_server(host: str, port: int, state: ServerState) -> ThreadingHTTPServer:
    """A ready (bound, not yet serving) server for ``state``."""
    handler = type("BoundHandler", (Handler,), {"state": state})
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


def main(argv: list[str] | None = None) -> int:
    """Run the server until interrupted; prints one ``listening on URL`` line when ready."""
    parser = argparse.ArgumentParser(
        prog="python -m gtp5g_op.gthulhu.testserver",
        description="Gthulhu-compatible API server with switchable faults, for tests and local trials.",
        epilog="example: python -m gtp5g_op.gthulhu.testserver --port 8080 --public-key-out /tmp/gthulhu.pub",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port (see the 'listening on' line)")
    parser.add_argument("--public-key-out", type=Path, help="write the server's public key PEM here")
    parser.add_argument("--private-key", type=Path, help="RSA private key PEM; created if missing (keeps the key across restarts)")
    parser.add_argument("--token-lifetime", type=int, default=86400, help="seconds a token stays valid (default 86400)")
    parser.add_argument("--token-shape", choices=("old", "new"), default="old", help="old: top-level token; new: data.token")
    parser.add_argument("--pods", type=Path, help="JSON list of pods {pod_name, labels, processes:[{pid, command}]}")
    parser.add_argument("--empty", action="store_true", help="start with no strategies instead of the default selector one")
    parser.add_argument("--fault", choices=FAULTS, help="start with this fault switched on")
    parser.add_argument("--slow-seconds", type=float, default=2.0)
    parser.add_argument("--tls-cert", type=Path, help="serve https with this certificate (PEM) ...")
    parser.add_argument("--tls-key", type=Path, help="... and this private key (PEM)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request (never headers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="gthulhu-testserver: %(message)s")

    state = ServerState(load_or_create_key(args.private_key), max(1, args.token_lifetime), args.token_shape)
    if args.empty:
        state.strategies = []
    if args.pods:
        state.pods = json.loads(args.pods.read_text())
    state.fault, state.slow_seconds = args.fault, args.slow_seconds
    if args.public_key_out:
        args.public_key_out.write_bytes(state.public_pem())
    server = make_server(args.host, args.port, state)
    scheme = "http"
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    host, port = server.server_address[:2]
    print(f"listening on {scheme}://{host}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
