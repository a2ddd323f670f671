"""Settings → the API client, pusher backend and pusher of the right Gthulhu generation.

``settings.api_kind`` is ``legacy``, ``manager`` or ``auto``; with ``auto`` the server is probed
(:mod:`gtp5g_op.gthulhu.detect`, read-only) before anything is written. A watch that starts while the
API is unreachable detects it at its first successful contact (:class:`AutoBackend`).
"""

from __future__ import annotations

import logging
from typing import Any

from gtp5g_op.config import Settings
from gtp5g_op.errors import ApiError, UsageError
from gtp5g_op.gthulhu.detect import LEGACY, MANAGER, detect
from gtp5g_op.gthulhu.dm import DecisionMakerReader
from gtp5g_op.gthulhu.http import HttpClient, HttpStatusError
from gtp5g_op.gthulhu.legacy import GthulhuClient, LegacyBackend
from gtp5g_op.gthulhu.manager import ManagerBackend, ManagerClient
from gtp5g_op.gthulhu.ownership import OwnershipStore
from gtp5g_op.gthulhu.sync import Backend, PushOutcome, StrategyPusher
from gtp5g_op.model import Target

log = logging.getLogger(__name__)

#: How long a watch waits, at start, for the API to say what it is before leaving that to the pusher.
PREFLIGHT_DEADLINE = 3.0


def _http_options(settings: Settings, retries: int = 2) -> dict[str, Any]:
    return {
        "ca_bundle": settings.ca_bundle_path(),
        "insecure": settings.insecure,
        "timeout": (min(3.05, settings.timeout), settings.timeout),
        "retries": retries,
        "deadline": settings.deadline,
        "max_body": settings.max_response,
    }


def probe_http(settings: Settings, deadline: float | None = None) -> HttpClient:
    """An HttpClient for probing ``settings.api_url`` (one try per request)."""
    options = _http_options(settings, retries=0) | {"max_body": 64 << 10}
    if deadline is not None:
        options["deadline"] = deadline
    return HttpClient(settings.api_url, **options)


def check_given_files(settings: Settings) -> None:
    """Read every credential file that was given, so a bad path is a usage error before any network call."""
    if settings.public_key is not None:
        settings.public_key_pem()
    if settings.password_file is not None:
        settings.manager_password()
    settings.ca_bundle_path()


def resolve_kind(settings: Settings, deadline: float | None = None) -> str:
    """``legacy`` or ``manager``: the configured kind, or the detected one with ``auto``."""
    check_given_files(settings)
    if settings.api_kind != "auto":
        return settings.api_kind
    with probe_http(settings, deadline) as http:
        return detect(http).kind


def require_credentials(settings: Settings, kind: str) -> None:
    """A UsageError now when the credentials ``kind`` needs are missing (rather than at the first push)."""
    if kind == LEGACY:
        settings.public_key_pem()
    elif kind == MANAGER:
        if not settings.username:
            raise UsageError(
                f"no user name for the Gthulhu Manager at {settings.api_url}",
                "give --username or set GTP5G_OP_USERNAME (and the password in GTP5G_OP_PASSWORD or --password-file)",
            )
        settings.manager_password()
        if settings.dm_url:
            settings.public_key_pem()  # the Decision Maker's token comes from its public key
    elif settings.public_key is None and not settings.username:
        raise UsageError(
            f"no credentials for the Gthulhu API at {settings.api_url} (neither a public key nor a user name)",
            "give --username and a password for a v1.x Manager, or --public-key for a legacy API server",
        )


def legacy_client(settings: Settings, url: str | None = None, retries: int = 2) -> GthulhuClient:
    """A legacy client (public key read from its file); ``url`` for a Decision Maker."""
    return GthulhuClient(url or settings.api_url, settings.public_key_pem(), **_http_options(settings, retries))


def manager_client(settings: Settings, retries: int = 2) -> ManagerClient:
    require_credentials(settings, MANAGER)
    assert settings.username is not None
    source = settings.manager_password if settings.password_file is not None else None
    return ManagerClient(settings.api_url, settings.username, settings.manager_password(),
                         password_source=source, **_http_options(settings, retries))


def dm_reader(settings: Settings) -> DecisionMakerReader | None:
    """A reader of ``--dm-url``'s Decision Maker, or None without one."""
    return DecisionMakerReader(legacy_client(settings, settings.dm_url)) if settings.dm_url else None


def connect(settings: Settings, kind: str | None = None) -> GthulhuClient | ManagerClient:
    """A client of the configured (or detected) generation."""
    kind = kind or resolve_kind(settings)
    require_credentials(settings, kind)
    return manager_client(settings) if kind == MANAGER else legacy_client(settings)


def make_backend(settings: Settings, kind: str) -> Backend:
    """The pusher backend for ``kind`` (``auto``: decided at the first contact)."""
    if kind == MANAGER:
        return ManagerBackend(manager_client(settings), settings.node_name, settings.policy, dm_reader(settings))
    if kind == LEGACY:
        return LegacyBackend(legacy_client(settings), settings.policy, OwnershipStore(settings.api_url, settings.state_dir),
                             settings.replace, settings.known_selectors)
    return AutoBackend(settings)


def make_pusher(settings: Settings, kind: str | None = None) -> StrategyPusher:
    """A pusher configured from ``settings`` (interval, debounce, and the backend of ``kind``)."""
    return StrategyPusher(make_backend(settings, kind or settings.api_kind), interval=settings.interval,
                          debounce=settings.debounce)


def preflight(settings: Settings) -> str:
    """Before a watch starts: the API's kind (detected within a few seconds, ``auto`` when it does not
    answer yet), a UsageError now for missing credentials, and an ApiError now when the server refuses
    the credentials (:func:`check_login`)."""
    kind = settings.api_kind
    require_credentials(settings, kind)  # before any network call
    if kind == "auto":
        try:
            kind = resolve_kind(settings, PREFLIGHT_DEADLINE)
        except ApiError as exc:
            log.warning("cannot tell which Gthulhu API is at %s yet (%s); deciding at the first answer",
                        settings.api_url, exc.one_line())
    require_credentials(settings, kind)
    if kind in (LEGACY, MANAGER):
        check_login(settings, kind)
    return kind


def check_login(settings: Settings, kind: str, deadline: float = PREFLIGHT_DEADLINE) -> None:
    """Log in once (a Manager user also reads its policies), within ``deadline`` seconds; nothing is written.

    A 4xx answer (wrong password or key, a user refused every call, no such route: the wrong ``--api``)
    is raised: a watch could never push with these settings. No answer, a timeout or a 5xx is only
    logged: the pusher keeps trying and logs in once the API answers.
    """
    try:
        with connect(settings, kind) as client, client.http.deadline_scope(deadline):
            client.authenticate()
            if isinstance(client, ManagerClient):
                client.list_policies()  # a user who must change its password first is refused only here
    except HttpStatusError as exc:
        if 400 <= exc.status < 500 and exc.status not in (408, 429):
            raise
        log.warning("cannot log in to %s yet (%s); pushing once it answers", settings.api_url, exc.one_line())
    except ApiError as exc:
        log.warning("cannot log in to %s yet (%s); pushing once it answers", settings.api_url, exc.one_line())


class AutoBackend:
    """Detects the API's generation at the first push that reaches it, then delegates to that backend."""

    kind = "auto"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.api_url = settings.api_url
        self._probe = probe_http(settings)
        self._backend: Backend | None = None

    @property
    def http(self) -> HttpClient:
        return self._backend.http if self._backend is not None else self._probe

    @property
    def token_renewals(self) -> int:
        return self._backend.token_renewals if self._backend is not None else 0

    @property
    def client(self) -> Any:
        return getattr(self._backend, "client", None)

    def push(self, targets: frozenset[Target]) -> PushOutcome:
        if self._backend is None:
            kind = detect(self._probe).kind
            require_credentials(self.settings, kind)
            self._backend = make_backend(self.settings, kind)
            self.kind = kind
        return self._backend.push(targets)

    def close(self) -> None:
        self._probe.close()
        if self._backend is not None:
            self._backend.close()
