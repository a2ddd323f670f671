"""Hostile API peers (issue 11, API half): each attack replayed against a real server on 127.0.0.1.

Every server here is a tiny ``http.server`` subclass written for the attack (a test double of a
malicious or broken peer, not of Gthulhu). Each test fails on the client before this work: it read
whole bodies into memory, had per-read timeouts only, slept any Retry-After, followed redirects,
accepted expired tokens, raised ValueError on a bad ``exp`` and quoted server text verbatim.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import psutil
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gtp5g_op.cli import main
from gtp5g_op.config import Policy
from gtp5g_op.errors import EXIT_API, EXIT_USAGE, ApiError
from gtp5g_op.gthulhu.http import HttpClient
from gtp5g_op.gthulhu.legacy import GthulhuClient, LegacyBackend
from gtp5g_op.gthulhu.manager import ManagerClient
from gtp5g_op.gthulhu.ownership import OwnershipStore
from gtp5g_op.gthulhu.secret import Secret
from gtp5g_op.gthulhu.sync import StrategyPusher
from gtp5g_op.model import Target

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PEM = KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
MiB = 1 << 20


def token(**claims) -> str:
    now = int(time.time())
    return jwt.encode({"iss": "bss-api-server", "iat": now, "exp": now + 3600, **claims}, KEY, algorithm="RS256")


class Peer(BaseHTTPRequestHandler):
    """Answers the token call properly and hands every other request to ``attack``."""

    protocol_version = "HTTP/1.1"
    requests: list[str]  # set per server
    attack = None  # (handler) -> None
    token_claims: dict = {}

    def log_message(self, *args) -> None:
        pass

    def send_json(self, status: int, doc, headers: dict | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self) -> None:
        self.requests.append(f"{self.command} {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        try:
            if self.path == "/api/v1/auth/token" and type(self).attack_token is None:
                self.send_json(200, {"success": True, "token": token(**self.token_claims)})
            elif self.path == "/api/v1/auth/token":
                type(self).attack_token(self)
            else:
                type(self).attack(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    attack_token = None
    do_GET = do_POST = do_PUT = do_DELETE = handle_any


@contextlib.contextmanager
def peer(attack=None, attack_token=None, **attrs):
    """A hostile server on 127.0.0.1; yields (url, list of requests seen)."""
    seen: list[str] = []
    handler = type("H", (Peer,), {"attack": staticmethod(attack) if attack else None,
                                  "attack_token": staticmethod(attack_token) if attack_token else None,
                                  "requests": seen, **attrs})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def client(url: str, **kw) -> GthulhuClient:
    kw.setdefault("retries", 0)
    return GthulhuClient(url, PEM, **kw)


class PeakRss:
    """The highest RSS of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.proc, self.base, self.peak, self._stop = psutil.Process(), psutil.Process().memory_info().rss, 0, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / MiB


def stream_forever(handler: Peer, chunk: bytes = b"[" * MiB, status: int = 200, length: int | None = None) -> None:
    """A body far larger than any cap: 300 MiB, chunked (or with a declared Content-Length)."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    if length is None:
        handler.send_header("Transfer-Encoding", "chunked")
    else:
        handler.send_header("Content-Length", str(length))
    handler.end_headers()
    for _ in range(300):
        data = chunk if length is not None else f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        handler.wfile.write(data)


# --- item 2: size caps -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["token", "strategies"])
def test_a_300_mib_answer_is_cut_at_the_cap(where):
    attack = stream_forever
    kwargs = {"attack_token": attack} if where == "token" else {"attack": attack}
    with peer(**kwargs) as (url, _), PeakRss() as rss:
        c = client(url, max_body=4 * MiB)
        with pytest.raises(ApiError, match=r"larger than the 4 MiB limit"):
            c.list_strategies()
    assert rss.growth_mib < 40, f"RSS grew {rss.growth_mib:.0f} MiB"


def test_a_declared_huge_length_is_refused_before_reading():
    with peer(attack=lambda h: stream_forever(h, length=300 * MiB)) as (url, _):
        started = time.monotonic()
        with pytest.raises(ApiError, match=r"larger than the 4 MiB limit \(Content-Length 314572800\)"):
            client(url).list_strategies()
        assert time.monotonic() - started < 2


def test_a_compressed_answer_is_refused():
    def gzip_answer(h):
        body = b"\x1f\x8b" + b"\0" * 100
        h.send_response(200)
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    with peer(attack=gzip_answer) as (url, _):
        with pytest.raises(ApiError, match="gzip-compressed although none was asked for"):
            client(url).list_strategies()


# --- item 3: deadlines -----------------------------------------------------------------------------


def trickle_body(handler: Peer) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "100")
    handler.end_headers()
    for _ in range(100):
        handler.wfile.write(b" ")
        handler.wfile.flush()
        time.sleep(2)


def trickle_headers(handler: Peer) -> None:
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    for byte in b"X-Slow: " + b"a" * 100:
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(2)


@pytest.mark.parametrize("attack", [trickle_body, trickle_headers], ids=["body", "headers"])
def test_one_byte_every_two_seconds_cannot_hold_a_call_past_its_deadline(attack):
    with peer(attack=attack) as (url, _):
        c = client(url, deadline=3.0, timeout=(1, 5))
        c.authenticate()
        started = time.monotonic()
        with pytest.raises(ApiError) as err:
            c.list_strategies()
        elapsed = time.monotonic() - started
    assert elapsed < 3.8, elapsed
    assert "no complete answer within 3." in err.value.message and "deadline is 3 s" in err.value.message


def test_retry_after_is_capped_and_the_deadline_holds():
    def unavailable(h):
        h.send_json(503, {"success": False, "error": "come back later"}, {"Retry-After": "20"})

    with peer(attack=unavailable) as (url, seen):
        c = client(url, retries=2, deadline=10.0)
        c.authenticate()
        started = time.monotonic()
        with pytest.raises(ApiError, match="HTTP 503: come back later"):
            c.list_strategies()
        elapsed = time.monotonic() - started
        assert 3.5 < elapsed < 6, elapsed  # two pauses of 2 s (the cap), not 20 s
        assert seen.count("GET /api/v1/scheduling/strategies") == 3
        c = client(url, retries=5, deadline=3.0)
        started = time.monotonic()
        with pytest.raises(ApiError, match="HTTP 503"):
            c.list_strategies()
        assert time.monotonic() - started < 3.5


def test_the_elapsed_time_is_quoted_not_the_per_read_timeout():
    """Issue 12 item 10: 'no answer within 5 s' after 15.7 s of retries."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        c = client(url, retries=2, timeout=(1, 0.5), backoff_factor=0.2, deadline=10)
        with pytest.raises(ApiError) as err:
            c.authenticate()
    message = err.value.message
    # 3 tries of 0.5 s each plus two pauses (0.2 s, 0.4 s): about 2.2 s, and the message says so
    assert re.search(r"no answer within 2\.\d s \(3 tries, each waiting at most 0\.5 s", message), message


def silent_server() -> tuple[socket.socket, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # accepts (the kernel does) and never answers
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_pusher_stop_is_bounded_whatever_the_api_does(tmp_path):
    sock, url = silent_server()
    with sock:
        c = client(url, retries=2, deadline=30.0, timeout=(3, 30))
        backend = LegacyBackend(c, Policy(), OwnershipStore(url, tmp_path))
        pusher = StrategyPusher(backend, debounce=0.05)
        pusher.start()
        pusher.update([Target(101, 101, "nr-gnb")])
        time.sleep(0.5)  # the first push now waits on the silent server
        started = time.monotonic()
        assert pusher.stop(final_push=True, timeout=3.0) is False
        elapsed = time.monotonic() - started
    assert elapsed < 4.0, elapsed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_watch_stops_within_seconds_while_the_api_never_answers(tmp_path, sig):
    from conftest import open_fifo_writer

    sock, url = silent_server()
    (tmp_path / "k.pub").write_bytes(PEM)
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "gtp5g_op", "watch", "--trace-pipe", str(fifo), "--no-validate", "--push", "--json",
           "--api", "legacy", "--api-url", url, "--public-key", str(tmp_path / "k.pub")]
    with sock:
        watch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env={**os.environ, "GTP5G_OP_STATE_DIR": str(tmp_path / "state")})
        try:
            with open_fifo_writer(fifo, watch) as pipe:
                pipe.write(b"nr-gnb-77 [001] ..s21 5.000000: bpf_trace_printk: stop: pid=77 (nr-gnb)\n")
                time.sleep(1.5)  # a push is in flight against the silent server
                started = time.monotonic()
                watch.send_signal(sig)
                out, err = watch.communicate(timeout=20)
            elapsed = time.monotonic() - started
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.communicate()
    assert elapsed < 8, (elapsed, err.decode()[-2000:])
    report = json.loads(out)
    assert report["push"]["final_push_ok"] is False and report["processes"][0]["pid"] == 77


# --- item 11: redirects, tokens, echoes ------------------------------------------------------------


def test_redirects_are_never_followed():
    with peer(attack=lambda h: h.send_json(200, {"success": True})) as (target, target_seen):
        def redirect(h):
            h.send_response(307)
            h.send_header("Location", target + "/api/v1/scheduling/strategies")
            h.send_header("Content-Length", "0")
            h.end_headers()

        with peer(attack=redirect, attack_token=redirect) as (url, _):
            with pytest.raises(ApiError) as err:
                client(url).post_strategies([{"pid": 1}])
    assert "HTTP 307 redirect to http://127.0.0.1:" in err.value.message and "never follow" in err.value.message
    assert target_seen == []  # the public key and the body never reached the other host


@pytest.mark.parametrize("claims,words", [
    ({"exp": int(time.time()) - 3600}, "s ago (beyond the 120 s clock-skew allowance)"),
    ({"exp": "soon"}, "exp claim is not a number"),
    ({"exp": None}, "MissingRequiredClaimError"),
    ({"exp": float("inf")}, ""),
    ({"exp": True}, "exp claim is not a number"),
])
def test_expired_or_malformed_tokens_are_api_errors(claims, words):
    with peer(attack=lambda h: h.send_json(200, {"success": True, "scheduling": []}), token_claims=claims) as (url, _):
        with pytest.raises(ApiError) as err:
            client(url).authenticate()
    assert words in err.value.message


def test_a_token_within_the_clock_skew_allowance_is_accepted():
    claims = {"iat": int(time.time()) - 3000, "exp": int(time.time()) - 60}  # 60 s late < 120 s allowance
    with peer(attack=lambda h: h.send_json(200, {"success": True, "scheduling": []}), token_claims=claims) as (url, _):
        assert client(url).list_strategies() == []


def test_no_fragment_of_a_token_or_password_in_any_error_text():
    def echo_token(h):
        bearer = h.headers.get("Authorization", "")[7:]
        h.send_json(401, {"success": False, "error": f"invalid token {bearer[5:60]} (sig {bearer[-30:]})"})

    def echo_password(h):
        body = json.loads(h.body or b"{}")
        h.send_json(401, {"success": False, "error": f"bad password <{body.get('password', '')[2:]}>"})

    with peer(attack=echo_token) as (url, _):
        c = client(url)
        c.authenticate()
        secret = c._token.reveal()
        with pytest.raises(ApiError) as err:
            c.list_strategies()
    text = err.value.one_line()
    assert "[redacted]" in text
    assert not any(secret[i:i + 8] in text for i in range(len(secret) - 7)), text
    password = "correct-horse-battery-staple"
    with peer(attack=echo_password) as (url, _):
        m = ManagerClient(url, "ops", Secret(password), retries=0)
        with pytest.raises(ApiError) as err:
            m.authenticate()
    text = err.value.one_line() + repr(m) + repr(err.value)
    assert not any(password[i:i + 8] in text for i in range(len(password) - 7)), text
    assert "HTTP 401" in text and str(url) in text


# --- issue 12 item 6: the fix fits the situation ------------------------------------------------------


def test_https_to_a_plain_http_server_says_so(gthulhu_server):
    url = gthulhu_server.url.replace("http://", "https://")
    with pytest.raises(ApiError) as err:
        client(url).authenticate()
    assert "speaks plain HTTP" in err.value.message
    assert err.value.fix == f"use {gthulhu_server.url.replace('https', 'http')} as the URL" and "--ca-bundle" not in err.value.fix


def test_an_api_url_with_a_path_gets_the_base_url_fix(gthulhu_server):
    with pytest.raises(ApiError) as err:
        client(gthulhu_server.url + "/api").authenticate()
    assert "HTTP 404" in err.value.message and "/api/api/v1/auth/token" in err.value.message
    assert f"use {gthulhu_server.url} (without /api)" in err.value.fix
    res = CliRunner().invoke(main, ["strategies", "--api-url", gthulhu_server.url + "/api", "list"],
                             env={"GTP5G_OP_PUBLIC_KEY": str(gthulhu_server.public_key)})
    assert res.exit_code == EXIT_API and "base URL" in res.output and len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("url,words", [
    ("http://127.0.0.1:99999", "Port out of range"),
    ("http://127.0.0.1:0", "port 0"),
    ("http://user:hunter2@127.0.0.1:8080", "carries credentials"),
    ("127.0.0.1:8080", "not an http(s) URL"),
    ("http://127.0.0.1:8080/?x=1", "query"),
])
def test_a_malformed_url_is_a_usage_error_before_any_connection(url, words, tmp_path):
    res = CliRunner().invoke(main, ["strategies", "--api-url", url, "--public-key", str(tmp_path / "x"), "list"])
    assert res.exit_code == EXIT_USAGE, res.output
    assert words in res.output and "cannot connect" not in res.output and "hunter2" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_abort_ends_a_call_in_flight_at_once():
    sock, url = silent_server()
    with sock:
        http = HttpClient(url, deadline=30, timeout=(3, 30))
        timer = threading.Timer(0.5, http.abort)
        timer.start()
        started = time.monotonic()
        with pytest.raises(ApiError, match="abandoned after 0.5 s"):
            http.request("GET", "/health")
        assert time.monotonic() - started < 1.5


def test_secrets_never_in_repr_or_pickle():
    import pickle

    s = Secret("hunter2-password")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in f"{s}"
    with pytest.raises(TypeError):
        pickle.dumps(s)
    settings_repr = repr(__import__("gtp5g_op.config", fromlist=["load_settings"]).load_settings(
        env={"GTP5G_OP_PASSWORD": "hunter2-password"}))
    assert "hunter2" not in settings_repr


def test_password_file_errors_are_one_line(tmp_path):
    from gtp5g_op.config import load_settings
    from gtp5g_op.errors import UsageError

    for n, (setup, words) in enumerate(((lambda p: p.mkdir(), "is a directory"), (lambda p: None, "does not exist"),
                         (lambda p: p.write_bytes(b"\xff\xfe"), "not UTF-8"), (lambda p: p.write_text("\n"), "is empty"),
                         (lambda p: p.write_bytes(b"x" * 5000), "larger than 4096 bytes"))):
        path = tmp_path / f"pw{n}"
        setup(path)
        with pytest.raises(UsageError, match=words) as err:
            load_settings(env={}, password_file=path).manager_password()
        assert "xff" not in err.value.one_line()  # no byte of the file is quoted
    (tmp_path / "ok").write_text("s3cret\nignored\n")
    assert load_settings(env={}, password_file=tmp_path / "ok").manager_password().reveal() == "s3cret"
    assert Path(tmp_path / "ok").exists()
