"""Options shared across the command tree, accepted on a group and on every sub-command below it.

``gtp5g-op -v strategies --api-url URL list`` and ``gtp5g-op strategies list --api-url URL -v`` mean
the same, as with kubectl and gh: a shared option given at several levels takes the value nearest to
the command. Values live in ``ctx.meta`` (one dict for the whole context chain); a command reads them
with :func:`shared_values`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from gtp5g_op import userfiles

_KEY = "gtp5g_op.shared"


class Number(click.ParamType):
    """A finite number in a range: click's FloatRange lets nan and inf through (nan compares false)."""

    name = "number"

    def __init__(self, minimum: float = 0.0, maximum: float = 1e9, *, min_open: bool = True):
        self.minimum, self.maximum, self.min_open = minimum, maximum, min_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from gtp5g_op.config import finite_number
        from gtp5g_op.errors import UsageError

        what = param.opts[0] if param else "value"
        try:
            return finite_number(value, what, self.minimum, self.maximum, min_open=self.min_open)
        except UsageError as exc:
            self.fail(f"{exc.message.removeprefix(what + '=')}; fix: {exc.fix}", param, ctx)

OptionSpec = tuple[tuple[str, ...], dict[str, Any]]

VERBOSE: OptionSpec = (("-v", "--verbose"), {"count": True, "help": "More log output (-vv for debug)."})
LOG_FORMAT: OptionSpec = (
    ("--log-format",),
    {"type": click.Choice(["text", "json"]), "help": "Log lines as text or one JSON object each. [default: text]"},
)
CONFIG: OptionSpec = (
    ("--config",),
    {"metavar": "TOML", "help": "Config file (see docs/config.md). [env GTP5G_OP_CONFIG]"},
)
GLOBAL: tuple[OptionSpec, ...] = (VERBOSE, LOG_FORMAT, CONFIG)

API: tuple[OptionSpec, ...] = (
    (("--api-url",), {"metavar": "URL", "help": "Gthulhu API base URL. [env GTP5G_OP_API_URL; default http://127.0.0.1:8080]"}),
    (("--api", "api_kind"), {
        "type": click.Choice(["auto", "legacy", "manager"], case_sensitive=False),
        "help": "API generation: legacy (PID strategies), manager (Gthulhu v1.x node policies) or auto-detect. "
                "[env GTP5G_OP_API; default auto]",
    }),
    (("--public-key",), {"metavar": "PEM", "help": "Legacy API (or Decision Maker) RSA public key. [env GTP5G_OP_PUBLIC_KEY]"}),
    (("--username",), {"metavar": "NAME", "help": "Manager user. [env GTP5G_OP_USERNAME]"}),
    (("--password-file",), {"metavar": "FILE", "help": "Manager password, first line of FILE. "
                            "[env GTP5G_OP_PASSWORD_FILE; or the password itself in GTP5G_OP_PASSWORD]"}),
    (("--node-name",), {"metavar": "NODE", "help": "This host's Kubernetes node name (Manager policies). "
                        "[env NODE_NAME; default the host name]"}),
    (("--dm-url",), {"metavar": "URL", "help": "This node's Gthulhu Decision Maker, read to show what it boosts. "
                     "[env GTP5G_OP_DM_URL]"}),
    (("--ca-bundle",), {"metavar": "FILE", "help": "CA bundle for an https API."}),
    (("--insecure",), {"is_flag": True, "default": None, "help": "Do not verify the API's TLS certificate."}),
)
STATE_DIR: OptionSpec = (
    ("--state-dir",),
    {"metavar": "DIR", "help": "State and lock directory, owned by you and not group/other-writable. "
     "[env GTP5G_OP_STATE_DIR; default /run/gtp5g-op as root]"},
)


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Record a value the user gave (flag or env), so the nearest level wins."""
    if value is not None and ctx.get_parameter_source(param.name) is not ParameterSource.DEFAULT:
        ctx.meta.setdefault(_KEY, {})[param.name] = value
    return value


def shared_options(*specs: OptionSpec) -> Callable[[Callable], Callable]:
    """Declare ``specs`` on a command or group; read them back with :func:`shared_values`."""

    def decorate(func: Callable) -> Callable:
        for decls, attrs in reversed(specs):
            func = click.option(*decls, expose_value=False, callback=_remember, **attrs)(func)
        return func

    return decorate


def shared_values(ctx: click.Context) -> dict[str, Any]:
    """The shared options given anywhere on the command line (nearest level wins), by parameter name."""
    return dict(ctx.meta.get(_KEY, {}))


def api_flags(ctx: click.Context) -> dict[str, Any]:
    """The API options as ``config.load_settings`` keywords (absent ones are None)."""
    given = shared_values(ctx)
    flags: dict[str, Any] = {}
    for decls, _attrs in API:
        name = next((d for d in decls if not d.startswith("-")), decls[0].lstrip("-").replace("-", "_"))
        flags[name] = given.get(name)
    for name in ("public_key", "ca_bundle", "password_file"):
        if flags[name] is not None:
            flags[name] = Path(flags[name])
    return flags


def setup_logs(ctx: click.Context) -> None:
    """Configure logging from the shared -v / --log-format options."""
    from gtp5g_op.ops.logs import setup_logging

    given = shared_values(ctx)
    setup_logging(given.get("verbose", 0), given.get("log_format") or "text")


def command_options(*specs: OptionSpec) -> Callable[[Callable], Callable]:
    """:func:`shared_options` for a leaf command that also sets up logging (-v, --log-format) before it runs."""

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def with_logs(*args: Any, **kwargs: Any) -> Any:
            setup_logs(click.get_current_context())
            return func(*args, **kwargs)

        return shared_options(*specs)(with_logs)

    return decorate


class UserPath(click.ParamType):
    """A path option or argument checked by :mod:`gtp5g_op.userfiles` (the same one-line errors everywhere).

    ``what`` names it in errors (``"export set"``); ``kinds`` are the acceptable kinds of file; with
    ``must_exist=False`` only an existing path of the wrong kind is refused (an output directory).
    """

    name = "path"

    def __init__(self, what: str, kinds: Collection[str] = userfiles.FILES, must_exist: bool = True,
                 fix: str | None = None):
        self.what, self.kinds, self.must_exist, self.fix = what, frozenset(kinds), must_exist, fix

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # ~name of a user this host does not have
            self.fail(f"{self.what} {value}: no such user's home directory; fix: give an absolute path", param, ctx)
        if self.must_exist or path.exists():
            userfiles.check(path, self.what, kinds=self.kinds, readable=self.must_exist, fix=self.fix)
        return path

