"""Which Gthulhu API generation answers at ``--api-url``: a legacy API server or a v1.x Manager.

Only requests that change nothing on any Gthulhu server are sent, in this order:

1. ``POST /api/v1/auth/login`` with ``{}``: a Manager checks for empty fields before anything else and
   answers 422 ``{"success": false, ...}`` (no user is looked up, no token issued); legacy servers and
   Decision Makers have no such route (404).
2. ``GET /api/v1/node-intents/merkle`` without a token: a v1.3 Decision Maker answers 401 (the route
   exists behind its token check); legacy servers answer 404.
3. ``POST /api/v1/auth/token`` with ``{}``: a legacy server answers 400 or 401 ``{"success": false,
   ...}`` (no public key, so no token). So does a v1.0 to v1.2 Decision Maker (no node-intents route
   yet). It is told apart by two signs together: its 404 to step 1 is echo's JSON ``{"message": "Not
   Found"}`` (the legacy server, a gorilla/mux application, answers ``404 page not found`` as text),
   and ``GET /version`` lists its ``/api/v1/intents`` endpoint (the legacy server has no /version).

Anything else is an error, and nothing is written: a wrong guess never reaches a write.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from gtp5g_op.errors import ApiError, UsageError
from gtp5g_op.gthulhu.http import HttpClient, Reply

log = logging.getLogger(__name__)

LEGACY, MANAGER = "legacy", "manager"
NAMES = {LEGACY: "legacy Gthulhu API server", MANAGER: "Gthulhu v1.x Manager"}


@dataclass(frozen=True)
class Detection:
    kind: str  # LEGACY or MANAGER
    evidence: str  # the answer that decided it


def _gthulhu_error(reply: Reply) -> bool:
    doc = reply.json()
    return isinstance(doc, dict) and doc.get("success") is False and isinstance(doc.get("error"), str)


def _echo_not_found(reply: Reply) -> bool:
    """echo's default 404 (every v1.x Gthulhu server): ``{"message": "Not Found"}``, no ``success``."""
    doc = reply.json()
    return reply.status == 404 and isinstance(doc, dict) and doc.get("message") == "Not Found" and "success" not in doc


def _dm_version(http: HttpClient) -> bool:
    """Whether ``GET /version`` is a v1.x Decision Maker's: its endpoint list names /api/v1/intents."""
    doc = http.request("GET", "/version").json()
    return isinstance(doc, dict) and isinstance(doc.get("endpoints"), str) and "/api/v1/intents" in doc["endpoints"]


def _dm_error(http: HttpClient) -> UsageError:
    return UsageError(
        f"{http.base_url} is a Gthulhu v1.x Decision Maker, which takes no pushes (its Manager overwrites it)",
        "point --api-url at the Gthulhu Manager (<release>-manager:8080) and give this URL as --dm-url",
    )


def detect(http: HttpClient) -> Detection:
    """Probe ``http``'s server (read-only); a Detection, or an error saying what answered instead."""
    login = http.request("POST", "/api/v1/auth/login", body={})
    if login.status in (400, 401, 422) and _gthulhu_error(login):
        found = Detection(MANAGER, f"POST /api/v1/auth/login answered {login.status}")
    else:
        merkle = http.request("GET", "/api/v1/node-intents/merkle")
        if merkle.status == 401 and _gthulhu_error(merkle):
            raise _dm_error(http)
        token = http.request("POST", "/api/v1/auth/token", body={})
        if token.status in (400, 401) and _gthulhu_error(token):
            if _echo_not_found(login) and _dm_version(http):  # a Decision Maker older than v1.3
                raise _dm_error(http)
            found = Detection(LEGACY, f"POST /api/v1/auth/token answered {token.status}")
        else:
            raise _unknown(http, login, token)
    log.info("%s is a %s (auto-detected: %s)", http.base_url, NAMES[found.kind], found.evidence)
    return found


def _unknown(http: HttpClient, login: Reply, token: Reply) -> ApiError:
    parts = urlsplit(http.base_url)
    statuses = f"POST /api/v1/auth/login: HTTP {login.status}, POST /api/v1/auth/token: HTTP {token.status}"
    if parts.path not in ("", "/") and 404 in (login.status, token.status):
        fix = (f"the URL must be the server's base URL without a path: use {parts.scheme}://{parts.netloc} "
               f"(without {http.redactor.clean(parts.path, 60)})")
    else:
        fix = ("check --api-url: it must be the Gthulhu Manager (e.g. http://gthulhu-manager:8080) or a legacy "
               "Gthulhu API server; --api manager or --api legacy skips detection")
    return ApiError(f"{http.base_url} answers neither as a Gthulhu Manager nor as a legacy Gthulhu API ({statuses})", fix)
