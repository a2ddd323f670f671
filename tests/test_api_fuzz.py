"""Property tests: whatever a server answers (garbage bytes, random JSON, wrong shapes), both API
generations' clients and reconcilers end with a result or an ApiError, never another exception."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gtp5g_op.config import Policy
from gtp5g_op.errors import ApiError
from gtp5g_op.gthulhu.legacy import GthulhuClient, LegacyBackend
from gtp5g_op.gthulhu.manager import ManagerBackend, ManagerClient, comm_regex
from gtp5g_op.gthulhu.ownership import OwnershipStore
from gtp5g_op.gthulhu.secret import Secret
from gtp5g_op.model import Target

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PEM = KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
TARGETS = frozenset({Target(101, 101, "nr-gnb"), Target(102, 101, "nr-gnb"), Target(103, 103, "nr-ue")})


class Scripted(BaseHTTPRequestHandler):
    """Answers each path with what the test put in ``answers`` (status, body bytes); a real server."""

    protocol_version = "HTTP/1.1"
    answers: dict[str, tuple[int, bytes]] = {}

    def log_message(self, *args) -> None:
        pass

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, body = self.answers.get(self.path.split("?")[0], (404, b'{"message":"Not Found"}'))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _any


@pytest.fixture(scope="module")
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


SCALAR = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def shaped(keys: list[str]) -> st.SearchStrategy:
    """Objects with the keys a client looks for, each holding any JSON value (or a plausible one)."""
    return st.fixed_dictionaries({}, optional={k: JSON for k in keys})


LEGACY_ITEM = shaped(["pid", "priority", "execution_time", "selectors", "command_regex"]) | st.fixed_dictionaries(
    {"pid": st.integers(-5, 2**33), "priority": st.booleans() | st.integers(-2, 20),
     "execution_time": st.integers(-5, 2**65)},
    optional={"selectors": st.lists(st.fixed_dictionaries({"key": JSON, "value": JSON}), max_size=2),
              "command_regex": JSON})
LEGACY_DOC = st.fixed_dictionaries({"success": JSON, "scheduling": st.lists(LEGACY_ITEM, max_size=5) | JSON}) | JSON

POLICY_ITEM = shaped(["id", "nodeNames", "commandRegex", "priority", "executionTime", "nodeSelectors"]) | st.fixed_dictionaries(
    {"id": st.sampled_from(["a" * 24, "0123456789abcdef01234567", "zz", ""]) | JSON,
     "nodeNames": st.lists(st.sampled_from(["node-a", "node-b"]), max_size=2) | JSON,
     "commandRegex": st.sampled_from([comm_regex(["nr-gnb"]), comm_regex(["nr-ue", "x"], "manual"), "(", "a{1000000}"]) | JSON,
     "priority": st.integers(-3, 20) | JSON, "executionTime": st.integers(0, 2**40) | JSON})
MANAGER_DOC = st.fixed_dictionaries({"success": st.just(True) | JSON, "data": st.fixed_dictionaries(
    {"policies": st.lists(POLICY_ITEM, max_size=4) | JSON}) | JSON}) | JSON
BODY = st.binary(max_size=300) | JSON.map(lambda d: json.dumps(d).encode()) | st.sampled_from(
    [b"[" * 100000, b"{" * 50000, b'{"success": true, "data": ' + b"1" * 5000 + b"}", b"\xff\xfe\x00", b""])
STATUS = st.sampled_from([200, 200, 200, 201, 204, 400, 401, 403, 404, 405, 422, 500, 503])


def _token_answer(claims: dict | None = None) -> bytes:
    """A token signed by KEY whose claims may be anything JSON (JWS, so PyJWT's encoder checks nothing)."""
    now = int(time.time())
    payload = json.dumps({"exp": now + 3600, "iat": now, **(claims or {})}).encode()
    token = jwt.api_jws.PyJWS().encode(payload, KEY, algorithm="RS256")
    return json.dumps({"success": True, "token": token}).encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=STATUS, doc=LEGACY_DOC, raw=BODY, use_raw=st.booleans(), post=st.tuples(STATUS, BODY))
def test_legacy_reconciliation_survives_any_answer(scripted, tmp_path, status, doc, raw, use_raw, post):
    Scripted.answers = {
        "/api/v1/auth/token": (200, _token_answer()),
        "/api/v1/scheduling/strategies": (status, raw if use_raw else json.dumps(doc).encode()),
    }
    client = GthulhuClient(scripted, PEM, retries=0, deadline=5)
    backend = LegacyBackend(client, Policy(), OwnershipStore(scripted, tmp_path))
    try:
        backend.push(TARGETS)
    except ApiError:
        pass
    finally:
        client.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=STATUS, answer=JSON, raw=BODY, use_raw=st.booleans())
def test_legacy_token_answers(scripted, status, answer, raw, use_raw):
    body = raw if use_raw else json.dumps(answer).encode()
    Scripted.answers = {"/api/v1/auth/token": (status, body)}
    try:
        GthulhuClient(scripted, PEM, retries=0, deadline=5).authenticate()
    except ApiError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(claims=st.dictionaries(st.sampled_from(["exp", "iat", "nbf", "iss"]), JSON, max_size=4))
def test_legacy_token_claims(scripted, claims):
    Scripted.answers = {"/api/v1/auth/token": (200, _token_answer(claims))}
    try:
        GthulhuClient(scripted, PEM, retries=0, deadline=5).authenticate()
    except ApiError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(login=st.tuples(STATUS, JSON), policies=st.tuples(STATUS, MANAGER_DOC), raw=BODY, use_raw=st.booleans(),
       write=st.tuples(STATUS, BODY))
def test_manager_reconciliation_survives_any_answer(scripted, login, policies, raw, use_raw, write):
    login_status, login_doc = login
    if login_status == 200 and isinstance(login_doc, dict):  # often a plausible login, to get further in
        login_doc = {"success": True, "data": {"accessToken": "t" * 40, "refreshToken": "r" * 40}}
    Scripted.answers = {
        "/api/v1/auth/login": (login_status, json.dumps(login_doc).encode()),
        "/api/v1/auth/refresh": (401, b'{"success": false, "error": "no"}'),
        "/api/v1/node-scheduling-policies/self": (policies[0], raw if use_raw else json.dumps(policies[1]).encode()),
        "/api/v1/node-scheduling-policies": write,
    }
    client = ManagerClient(scripted, "ops", Secret("pw-12345678"), retries=0, deadline=5)
    try:
        ManagerBackend(client, "node-a", Policy()).push(TARGETS)
    except ApiError:
        pass
    finally:
        client.close()
