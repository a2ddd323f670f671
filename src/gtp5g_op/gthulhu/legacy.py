"""Client for the Gthulhu API server: token from the public key, RS256 check, renewal, retries.

The token lives only in this object's memory: it is never logged, never part of an exception, a
``repr`` or an error message, and never written to disk. urllib3 logs URLs and status lines only
(never headers), and its per-retry warnings are demoted to debug so an outage is logged once by the
caller, not once per retry.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Self

import jwt
import requests
import urllib3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from gtp5g_op.errors import ApiError, UsageError

log = logging.getLogger(__name__)

TOKEN_PATH = "/api/v1/auth/token"
STRATEGIES_PATH = "/api/v1/scheduling/strategies"
PODS_PATH = "/api/v1/pods/pids"
RETRY_STATUSES = (500, 502, 503, 504)
_MAX_MESSAGE = 200


class _RetryWarningsToDebug(logging.Filter):
    """urllib3 warns on every retry; keep those only when gtp5g-op logs at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.getMessage().startswith("Retrying"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return log.isEnabledFor(logging.DEBUG)
        return True


_urllib3_log = logging.getLogger("urllib3.connectionpool")
if not any(isinstance(f, _RetryWarningsToDebug) for f in _urllib3_log.filters):
    _urllib3_log.addFilter(_RetryWarningsToDebug())


def load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    """The RSA public key in ``pem``; a UsageError saying what is wrong otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise UsageError(
            "the public key file is not a PEM public key",
            "give the Gthulhu server's public key (-----BEGIN PUBLIC KEY-----), e.g. from its jwt secret",
        ) from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise UsageError("the public key is not an RSA key", "Gthulhu signs tokens with RS256: give its RSA public key")
    return key


class GthulhuClient:
    """Authenticated access to one Gthulhu API server.

    ``timeout`` is requests' ``(connect, read)`` pair; ``retries`` is how many times urllib3 retries a
    request after a connection error, a read timeout or a 5xx answer, with exponential backoff
    (``backoff_factor``) plus random ``backoff_jitter``. POST is retried too: it replaces the whole set,
    so sending it twice is harmless. TLS is verified unless ``insecure``; ``ca_bundle`` adds a CA file.
    """

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
    ):
        self.api_url = api_url.rstrip("/")
        self._pem = public_key_pem
        self._key = load_public_key(public_key_pem)
        self.timeout = timeout
        self.renew_margin = renew_margin
        self.token_renewals = 0
        self._token: str | None = None
        self._renew_at = 0.0  # time.monotonic() after which the token is renewed
        self._lock = threading.Lock()
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            other=0,
            backoff_factor=backoff_factor,
            backoff_jitter=backoff_jitter,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=frozenset({"GET", "POST", "DELETE", "PUT"}),
            raise_on_status=False,  # hand back the last 5xx so the error can quote the server
            respect_retry_after_header=True,
        )
        self._session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        # Passed with every request: a session-level verify loses to REQUESTS_CA_BUNDLE in requests.
        self._verify: bool | str = False if insecure else (str(ca_bundle) if ca_bundle else True)
        self._session.headers["User-Agent"] = "gtp5g-op"
        if insecure and self.api_url.startswith("https://"):
            log.warning("TLS certificate checks are off for %s (--insecure)", self.api_url)
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    def __repr__(self) -> str:
        state = "token held" if self._token else "no token"
        return f"GthulhuClient({self.api_url!r}, {state})"

    def close(self) -> None:
        """Drop the connection pool and forget the token."""
        self._session.close()
        self._token = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- HTTP plumbing -------------------------------------------------------------------------

    def _send(self, method: str, path: str, token: str | None = None, body: Any = None) -> requests.Response:
        url = self.api_url + path
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            return self._session.request(method, url, json=body, headers=headers, timeout=self.timeout, verify=self._verify)
        except requests.exceptions.SSLError as exc:
            raise ApiError(
                f"{method} {url}: TLS verification failed ({_reason(exc)})",
                "pass --ca-bundle FILE with the server's CA, or --insecure to skip the check",
            ) from None
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as exc:
            if not _timed_out(exc):
                raise ApiError(
                    f"{method} {url}: cannot connect ({_reason(exc)})",
                    "check --api-url and that the Gthulhu API server is running",
                ) from None
            raise ApiError(
                f"{method} {url}: no answer within {self.timeout[1]:g} s",
                "check that the Gthulhu API is running and not overloaded",
            ) from None
        except requests.exceptions.RequestException as exc:
            raise ApiError(
                f"{method} {url}: cannot connect ({_reason(exc)})",
                "check --api-url and that the Gthulhu API server is running",
            ) from None

    def _json(self, method: str, path: str, resp: requests.Response) -> dict:
        url = self.api_url + path
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if resp.status_code >= 400:
            message = _server_message(doc, resp.text, self._token)
            fix = "check --public-key: it must be this server's key" if resp.status_code == 401 else (
                "check the Gthulhu API server's log"
            )
            raise ApiError(f"{method} {url}: HTTP {resp.status_code}: {message}", fix)
        if not isinstance(doc, dict):
            raise ApiError(
                f"{method} {url}: HTTP {resp.status_code} but the body is not a JSON object: "
                f"{_clip(_redact(resp.text, self._token))!r}",
                "is --api-url pointing at the Gthulhu API server?",
            )
        if doc.get("success") is False:
            raise ApiError(f"{method} {url}: server says: {_server_message(doc, '', self._token)}", "check the server's log")
        return doc

    # --- token ---------------------------------------------------------------------------------

    def _fetch_token(self) -> None:
        """Ask for a token with the public key, verify its RS256 signature and remember when to renew."""
        url = self.api_url + TOKEN_PATH
        resp = self._send("POST", TOKEN_PATH, body={"public_key": self._pem.decode("ascii", "replace")})
        doc = _safe_json(resp)
        if resp.status_code >= 400:
            fix = (
                "give the public key of the server at --api-url (--public-key / GTP5G_OP_PUBLIC_KEY)"
                if resp.status_code == 401
                else "check the Gthulhu API server's log"
            )
            text = resp.text if doc is None else ""
            raise ApiError(f"POST {url}: HTTP {resp.status_code}: {_server_message(doc, text, None)}", fix)
        # A 2xx body may hold a token in a shape we do not know: never quote it.
        if not isinstance(doc, dict) or doc.get("success") is False:
            raise ApiError(f"POST {url}: HTTP {resp.status_code} but not a token answer", "is --api-url a Gthulhu API server?")
        data = doc.get("data") if isinstance(doc.get("data"), dict) else {}
        token = doc.get("token") or data.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError(f"POST {url}: the answer carries no token", "is this a Gthulhu API server?")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["RS256"],
                options={"require": ["exp"], "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidTokenError as exc:
            raise ApiError(
                f"POST {url}: the token is not a valid RS256 JWT signed by the given public key ({type(exc).__name__})",
                "give the public key of the server at --api-url",
            ) from None
        now = time.monotonic()
        # Lifetime from the token's own iat/exp, anchored to our monotonic clock, so a skewed host
        # clock does not make a fresh token look expired. Both are whole seconds: the token may be
        # up to 1 s older than iat says, hence the - 1.
        iat = claims.get("iat") if isinstance(claims.get("iat"), (int, float)) else time.time()
        lifetime = max(0.0, float(claims["exp"]) - float(iat) - 1.0)
        margin = min(self.renew_margin, lifetime * 0.2)
        self._token = token
        self._renew_at = now + lifetime - margin
        self.token_renewals += 1
        log.debug("got a token from %s valid for %.0f s (renewing %.1f s early)", url, lifetime, margin)

    def _current_token(self, force: bool = False) -> str:
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
        resp = self._send(method, path, self._current_token(), body)
        if resp.status_code == 401:
            log.debug("%s %s answered 401; renewing the token once", method, path)
            resp = self._send(method, path, self._current_token(force=True), body)
        return self._json(method, path, resp)

    # --- API -----------------------------------------------------------------------------------

    def health(self) -> dict:
        """``GET /health`` (no token needed)."""
        return self._json("GET", "/health", self._send("GET", "/health"))

    def authenticate(self) -> None:
        """Get a fresh token now (useful to check the key before a long run)."""
        self._current_token(force=True)

    def list_strategies(self) -> list[dict]:
        """The server's resolved strategies (selector strategies expanded into per-PID entries)."""
        doc = self._call("GET", STRATEGIES_PATH)
        items = doc.get("scheduling")
        if items is None:
            return []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ApiError(f"GET {self.api_url}{STRATEGIES_PATH}: 'scheduling' is not a list of objects", "check the server version")
        return items

    def post_strategies(self, strategies: list[dict]) -> None:
        """Replace the server's whole strategy set with ``strategies``."""
        self._call("POST", STRATEGIES_PATH, {"strategies": strategies})

    def pods_pids(self) -> list[dict]:
        """``GET /api/v1/pods/pids``: pods with their processes (``pod_name``, ``processes`` ...)."""
        pods = self._call("GET", PODS_PATH).get("pods") or []
        if not isinstance(pods, list):
            raise ApiError(f"GET {self.api_url}{PODS_PATH}: 'pods' is not a list", "check the server version")
        return pods


def _safe_json(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "…"


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def _server_message(doc: Any, text: str, token: str | None) -> str:
    """The server's own words: ``error`` or ``message`` of a JSON body, else the clipped text."""
    if isinstance(doc, dict):
        for key in ("error", "message"):
            if isinstance(doc.get(key), str) and doc[key]:
                return _clip(_redact(doc[key], token))
    return _clip(_redact(text, token)) or "(empty body)"


def _timed_out(exc: Exception) -> bool:
    """True for a read timeout, also when urllib3 retried it and requests wrapped it as ConnectionError."""
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, urllib3.exceptions.ReadTimeoutError)


def _reason(exc: Exception) -> str:
    """The innermost cause of a requests exception, without the pool's repr noise."""
    cause: BaseException = exc
    while True:
        inner = getattr(cause, "reason", None) or cause.__cause__ or cause.__context__
        if inner is None or inner is cause or not isinstance(inner, BaseException):
            break
        cause = inner
    text = str(cause)
    if ": " in text and "Connection refused" in text:
        return "connection refused"
    return _clip(text) or type(cause).__name__

