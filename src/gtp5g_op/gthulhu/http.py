"""The one HTTP layer both Gthulhu API generations use: deadlines, size caps, no redirects, no secrets in text.

- **Deadline.** Every call has one overall deadline covering connecting, sending, every read of the
  answer, every retry and every pause between retries. requests' ``timeout`` bounds each socket
  operation only, so a server sending one byte every two seconds would hold a call for ever; a
  watchdog timer therefore shuts the call's sockets down when its deadline passes (the connection
  classes below register their socket with the call in flight). :meth:`HttpClient.abort` does the
  same at once, for a watch that is stopping, and :meth:`HttpClient.deadline_scope` caps every call
  made inside it (the final push at exit).
- **Size.** Answers are streamed and reading stops past ``max_body`` bytes (a larger
  ``Content-Length`` is refused before reading). Compression is not asked for and a compressed answer
  is refused, so the cap is on what is kept in memory.
- **Redirects** are never followed: a 3xx is an error naming where it pointed.
- **Retries** (connection errors, read errors of idempotent calls, 429 and 5xx answers) are made here
  rather than by urllib3's ``Retry`` inside the pool: urllib3 drains the whole body of a retried 5xx
  into memory, without a cap, and sleeps ``Retry-After`` with no regard for a deadline. Backoff is
  urllib3's formula; ``Retry.parse_retry_after`` reads the header, which is capped.
- **Secrets.** Passwords and tokens are :class:`Secret` objects (never in ``repr``/``str``), and every
  text built from an answer goes through a :class:`Redactor` that removes each secret and every
  fragment of one (a server echoing part of a token), escapes control characters and clips it.
- Proxies from the environment are not used (an in-cluster API is reached directly, and a proxy's
  sockets would escape the watchdog); ``REQUESTS_CA_BUNDLE`` still applies when no ``--ca-bundle``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from gtp5g_op.errors import ApiError
from gtp5g_op.gthulhu.secret import Redactor, Secret

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_MAX_BODY = 4 * MiB
DEFAULT_DEADLINE = 10.0
DEFAULT_RETRY_AFTER_CAP = 2.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_CHUNK = 64 * 1024
_NO_PROXY = {"http": None, "https": None}


# --- deadlines and the watchdog -------------------------------------------------------------------

_local = threading.local()


def _shut(sock: socket.socket) -> None:
    try:  # the plain socket call, also for an SSLSocket: unblocks a recv in another thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Call:
    """One call in flight: the sockets it uses, shut down when its deadline passes or on abort."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._done = False
        self.fired: str | None = None  # "deadline" or "abort"

    def add(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if self._done:
                return
            self._socks.append(sock)
            if self.fired:
                _shut(sock)

    def fire(self, why: str) -> None:
        with self._lock:
            if self._done or self.fired:
                return
            self.fired = why
            for sock in self._socks:
                _shut(sock)

    def finish(self) -> None:
        with self._lock:
            self._done = True


def _register(sock: socket.socket | None) -> None:
    call = getattr(_local, "call", None)
    if call is not None:
        call.add(sock)


class _Watched:
    """Mixed into a urllib3 connection: registers its socket with the call in flight, when it connects and
    when it is reused."""

    sock: Any

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _register(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _register(self.sock)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection  # type: ignore[assignment]


class _WatchedAdapter(HTTPAdapter):
    """requests' adapter with pools whose connections report their sockets to the watchdog."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedPool, "https": _WatchedHTTPSPool}


class _NoAuth(requests.auth.AuthBase):
    """Keeps requests from adding credentials from ~/.netrc (the calls carry their own)."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


# --- answers --------------------------------------------------------------------------------------


@dataclass
class Reply:
    """A complete answer: status, headers and the (size-capped) body."""

    method: str
    url: str
    status: int
    headers: CaseInsensitiveDict
    body: bytes
    elapsed: float
    _doc: Any = field(default=None, repr=False)
    _parsed: bool = field(default=False, repr=False)

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON (never raises)."""
        if not self._parsed:
            self._parsed = True
            try:
                self._doc = json.loads(self.body)
            except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
                self._doc = None
        return self._doc

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class HttpStatusError(ApiError):
    """An answer with an error status (``status``), as one line with the server's words and the fix."""

    def __init__(self, message: str, fix: str, status: int):
        super().__init__(message, fix)
        self.status = status


class _Transport(Exception):
    """A try that produced no answer: ``kind`` is connect, timeout, read, tls or other."""

    def __init__(self, kind: str, reason: str, cause: BaseException | None = None):
        super().__init__(reason)
        self.kind, self.reason, self.cause = kind, reason, cause


# --- the client -----------------------------------------------------------------------------------


class HttpClient:
    """HTTP calls to one API server (``base_url``) with the protections described in the module docstring.

    ``timeout`` is the ``(connect, read)`` limit of each socket operation, ``deadline`` the limit of a
    whole call in seconds, ``retries`` how many times a call is tried again (backoff
    ``backoff_factor * 2**n`` plus up to ``backoff_jitter``; a 429/5xx's ``Retry-After`` is obeyed up
    to ``retry_after_cap`` seconds), ``max_body`` the most bytes of an answer that are read.
    """

    def __init__(
        self,
        base_url: str,
        *,
        ca_bundle: str | None = None,
        insecure: bool = False,
        timeout: tuple[float, float] = (3.05, 5.0),
        deadline: float = DEFAULT_DEADLINE,
        retries: int = 2,
        backoff_factor: float = 0.2,
        backoff_jitter: float = 0.1,
        max_body: int = DEFAULT_MAX_BODY,
        retry_after_cap: float = DEFAULT_RETRY_AFTER_CAP,
        redactor: Redactor | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.connect_timeout, self.read_timeout = timeout
        self.deadline = deadline
        self.retries = retries
        self.backoff_factor, self.backoff_jitter = backoff_factor, backoff_jitter
        self.max_body = max_body
        self.retry_after_cap = retry_after_cap
        self.redactor = redactor or Redactor()
        self._verify: bool | str = False if insecure else (str(ca_bundle) if ca_bundle else True)
        self._session = requests.Session()
        adapter = _WatchedAdapter(max_retries=0, pool_maxsize=4)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.auth = _NoAuth()
        self._session.headers.update({"User-Agent": "gtp5g-op", "Accept-Encoding": "identity"})
        self._lock = threading.Condition()
        self._inflight: set[_Call] = set()
        self._abort_gen = 0
        if insecure and self.base_url.startswith("https://"):
            log.warning("TLS certificate checks are off for %s (--insecure)", self.base_url)
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    def __repr__(self) -> str:
        return f"HttpClient({self.base_url!r})"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        return self.base_url + path

    # --- deadlines ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def deadline_scope(self, seconds: float) -> Iterator[None]:
        """Every call made by this thread inside the block ends within ``seconds`` from now, together."""
        previous = getattr(_local, "scope_end", None)
        end = time.monotonic() + seconds
        _local.scope_end = end if previous is None else min(previous, end)
        try:
            yield
        finally:
            _local.scope_end = previous

    def abort(self) -> None:
        """End every call in flight now (their sockets are shut down; pauses between retries end)."""
        with self._lock:
            self._abort_gen += 1
            calls = list(self._inflight)
            self._lock.notify_all()
        for call in calls:
            call.fire("abort")

    # --- one call ----------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        token: Secret | None = None,
        idempotent: bool = True,
        deadline: float | None = None,
    ) -> Reply:
        """One API call (retries included) that ends within its deadline; a transport failure is an ApiError.

        Any HTTP status comes back as a :class:`Reply`; 3xx answers are errors (never followed).
        ``idempotent=False`` (a create) is not sent again once it may have reached the server.
        """
        url = self.url(path)
        started = time.monotonic()
        limit = self.deadline if deadline is None else deadline
        end = started + limit
        scope_end = getattr(_local, "scope_end", None)
        if scope_end is not None and scope_end < end:
            end, limit = scope_end, max(0.0, scope_end - started)
        headers = {"Authorization": f"Bearer {token.reveal()}"} if token else {}
        call = _Call()
        timer = threading.Timer(max(0.0, end - started), call.fire, args=("deadline",))
        timer.daemon = True
        with self._lock:
            gen = self._abort_gen
            self._inflight.add(call)
        _local.call = call
        timer.start()
        attempts = 0
        try:
            while True:
                attempts += 1
                reply: Reply | None = None
                failure: _Transport | None = None
                try:
                    reply = self._attempt(method, url, body, headers, end, started)
                except _Transport as exc:
                    failure = exc
                if call.fired or self._abort_gen != gen:
                    raise self._ended(method, url, call.fired or "abort", started, limit, attempts)
                if reply is not None:
                    if reply.status not in RETRY_STATUSES or not idempotent or attempts > self.retries:
                        return reply
                    wait = self._backoff(attempts)
                    retry_after = reply.headers.get("Retry-After")
                    if retry_after:
                        try:
                            wait = min(self.retry_after_cap, max(0.0, Retry().parse_retry_after(retry_after)))
                        except urllib3.exceptions.InvalidHeader:
                            pass
                    log.debug("%s %s: HTTP %d; trying again in %.2f s", method, url, reply.status, wait)
                else:
                    assert failure is not None
                    retryable = failure.kind == "connect" or (failure.kind in ("read", "timeout") and idempotent)
                    if not retryable or attempts > self.retries:
                        raise self._failed(method, url, failure, started, attempts)
                    wait = self._backoff(attempts)
                    log.debug("%s %s: %s; trying again in %.2f s", method, url, failure.reason, wait)
                if time.monotonic() + wait >= end:  # no time left for another try
                    if reply is not None:
                        return reply
                    assert failure is not None
                    raise self._failed(method, url, failure, started, attempts)
                with self._lock:
                    self._lock.wait_for(lambda: self._abort_gen != gen, timeout=wait)
                if self._abort_gen != gen:
                    raise self._ended(method, url, "abort", started, limit, attempts)
        finally:
            timer.cancel()
            call.finish()
            _local.call = None
            with self._lock:
                self._inflight.discard(call)

    def _backoff(self, attempts: int) -> float:
        """urllib3's backoff formula for the pause after the ``attempts``-th try."""
        return self.backoff_factor * (2 ** (attempts - 1)) + random.uniform(0, self.backoff_jitter)

    def _attempt(self, method: str, url: str, body: Any, headers: dict, end: float, started: float) -> Reply:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise _Transport("timeout", "deadline reached")
        timeout = (min(self.connect_timeout, remaining), min(self.read_timeout, remaining))
        try:
            resp = self._session.request(
                method, url, json=body, headers=headers, timeout=timeout, verify=self._verify,
                stream=True, allow_redirects=False, proxies=_NO_PROXY,
            )
        except requests.exceptions.RequestException as exc:
            raise _Transport(_kind(exc), _reason(exc), exc) from None
        try:
            if 300 <= resp.status_code < 400:
                location = resp.headers.get("Location", "")
                resp.close()
                raise self._redirected(method, url, resp.status_code, location)
            data = self._read(method, url, resp)
        except (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, OSError) as exc:
            resp.close()
            raise _Transport("timeout" if _timed_out(exc) else "read", _reason(exc), exc) from None
        except BaseException:
            resp.close()
            raise
        return Reply(method, url, resp.status_code, CaseInsensitiveDict(resp.headers), data, time.monotonic() - started)

    def _read(self, method: str, url: str, resp: requests.Response) -> bytes:
        encoding = resp.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise ApiError(
                f"{method} {url}: the answer is {self.redactor.clean(encoding, 40)}-compressed although none was asked for",
                "check that --api-url points at the Gthulhu API itself",
            )
        declared = resp.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > self.max_body:
            raise self._too_big(method, url, f"Content-Length {int(declared)}")
        data = bytearray()
        while chunk := resp.raw.read(_CHUNK, decode_content=False):
            data += chunk
            if len(data) > self.max_body:
                raise self._too_big(method, url, "more than that was sent")
        resp.raw.release_conn()
        return bytes(data)

    # --- errors ------------------------------------------------------------------------------------

    def _too_big(self, method: str, url: str, what: str) -> ApiError:
        return ApiError(
            f"{method} {url}: the answer is larger than the {_size(self.max_body)} limit ({what})",
            "check that --api-url is the Gthulhu API; api.max_response raises the limit",
        )

    def _redirected(self, method: str, url: str, status: int, location: str) -> ApiError:
        where = self.redactor.clean(location, 120) or "(no Location)"
        parts = urlsplit(location) if location else None
        if parts and parts.scheme in ("http", "https") and parts.netloc:
            fix = f"if you trust it, set --api-url to {parts.scheme}://{self.redactor.clean(parts.netloc, 80)}"
        else:
            fix = "set --api-url to the API server's own address"
        return ApiError(f"{method} {url}: HTTP {status} redirect to {where}; API calls never follow redirects", fix)

    def _ended(self, method: str, url: str, why: str, started: float, limit: float, attempts: int) -> ApiError:
        elapsed = time.monotonic() - started
        if why == "abort":
            return ApiError(f"{method} {url}: abandoned after {elapsed:.1f} s (stopping)", "none needed")
        return ApiError(
            f"{method} {url}: no complete answer within {elapsed:.1f} s "
            f"({_n(attempts, 'try', 'tries')}; the call's deadline is {limit:g} s)",
            "check that the Gthulhu API is running and not overloaded; api.deadline sets the limit",
        )

    def _failed(self, method: str, url: str, failure: _Transport, started: float, attempts: int) -> ApiError:
        elapsed = time.monotonic() - started
        tries = _n(attempts, "try", "tries")
        reason = self.redactor.clean(failure.reason)
        if failure.kind == "tls":
            return self._tls_error(method, url, failure, reason)
        if failure.kind == "timeout":
            return ApiError(
                f"{method} {url}: no answer within {elapsed:.1f} s ({tries}, each waiting at most "
                f"{self.read_timeout:g} s for the server)",
                "check that the Gthulhu API is running and not overloaded",
            )
        if failure.kind == "connect":
            return ApiError(
                f"{method} {url}: cannot connect ({reason}; {tries} in {elapsed:.1f} s)",
                "check --api-url (host and port) and that the Gthulhu API server is running",
            )
        if failure.kind == "read":
            return ApiError(
                f"{method} {url}: the connection broke before a complete answer ({reason}; {tries} in {elapsed:.1f} s)",
                "check the Gthulhu API server's log",
            )
        return ApiError(f"{method} {url}: request failed ({reason})", "check --api-url")

    def _tls_error(self, method: str, url: str, failure: _Transport, reason: str) -> ApiError:
        parts = urlsplit(url)
        if _cert_problem(failure.cause):
            return ApiError(
                f"{method} {url}: TLS verification failed ({reason})",
                "pass --ca-bundle FILE with the server's CA, or --insecure to skip the check",
            )
        if parts.hostname and _speaks_plain_http(parts.hostname, parts.port or 443, min(1.0, self.connect_timeout)):
            return ApiError(
                f"{method} {url}: TLS handshake failed: the server at {parts.netloc} speaks plain HTTP, not HTTPS",
                f"use http://{parts.netloc} as the URL",
            )
        return ApiError(f"{method} {url}: TLS handshake failed ({reason})", "check that the server speaks HTTPS on that port")

    def error(self, reply: Reply, fix: str, what: str | None = None) -> HttpStatusError:
        """The one-line error for an answer with a bad status: method, URL, status and the server's words."""
        message = what or server_message(reply, self.redactor)
        if reply.status == 404:
            path = urlsplit(self.base_url).path
            if path not in ("", "/"):
                parts = urlsplit(self.base_url)
                fix = (f"the URL must be the server's base URL without a path: use {parts.scheme}://{parts.netloc} "
                       f"(without {self.redactor.clean(path, 60)})")
        return HttpStatusError(f"{reply.method} {reply.url}: HTTP {reply.status}: {message}", fix, reply.status)


def server_message(reply: Reply, redactor: Redactor) -> str:
    """The server's own words: ``error`` or ``message`` of a JSON body, else the clipped text."""
    doc = reply.json()
    if isinstance(doc, dict):
        for key in ("error", "message"):
            if isinstance(doc.get(key), str) and doc[key].strip():
                return redactor.clean(doc[key])
    return redactor.clean(reply.text()) or "(empty body)"


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"


def _kind(exc: requests.exceptions.RequestException) -> str:
    """What kind of failure a requests exception is, for the retry decision."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "tls"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connect"
    if isinstance(exc, requests.exceptions.ReadTimeout) or _timed_out(exc):
        return "timeout"
    if isinstance(exc, requests.exceptions.ConnectionError):
        inner = exc.args[0] if exc.args else None
        reason = getattr(inner, "reason", inner)
        if isinstance(reason, urllib3.exceptions.NewConnectionError):
            return "connect"  # refused, unreachable or unresolvable: nothing was sent
        return "read"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return "read"
    return "other"


def _timed_out(exc: BaseException) -> bool:
    """True for a read timeout, also when requests wrapped it as a ConnectionError."""
    cause: BaseException | None = exc
    for _ in range(6):
        if cause is None:
            return False
        if isinstance(cause, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError, socket.timeout)):
            return True
        inner = cause.args[0] if cause.args and isinstance(cause.args[0], BaseException) else None
        cause = getattr(cause, "reason", None) or inner or cause.__cause__ or cause.__context__
    return False


def _reason(exc: BaseException) -> str:
    """The innermost cause of a requests/urllib3 exception, without the pool's repr noise."""
    cause: BaseException = exc
    for _ in range(8):
        inner = getattr(cause, "reason", None)
        if not isinstance(inner, BaseException):
            inner = cause.args[0] if cause.args and isinstance(cause.args[0], BaseException) else None
        inner = inner or cause.__cause__ or cause.__context__
        if inner is None or inner is cause or not isinstance(inner, BaseException):
            break
        cause = inner
    text = str(cause)
    if "Connection refused" in text:
        return "connection refused"
    if isinstance(cause, urllib3.exceptions.NameResolutionError) or "Name or service not known" in text:
        return "cannot resolve the host name"
    return " ".join(text.split()) or type(cause).__name__


def _cert_problem(exc: BaseException | None) -> bool:
    """Whether a TLS failure is about the certificate (rather than the protocol)."""
    cause, seen = exc, 0
    while cause is not None and seen < 8:
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(cause):
            return True
        inner = getattr(cause, "reason", None)
        if not isinstance(inner, BaseException):
            inner = cause.args[0] if cause.args and isinstance(cause.args[0], BaseException) else None
        cause, seen = inner or cause.__cause__ or cause.__context__, seen + 1
    return False


def _speaks_plain_http(host: str, port: int, timeout: float) -> bool:
    """Whether ``host:port`` answers a plain-text HTTP request (so https:// was the wrong scheme)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"HEAD / HTTP/1.0\r\nHost: " + host.encode("ascii", "replace") + b"\r\n\r\n")
            return sock.recv(5) == b"HTTP/"
    except (OSError, UnicodeError):
        return False
