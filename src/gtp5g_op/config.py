"""Settings from a TOML file, GTP5G_OP_* environment variables and command-line flags.

Precedence: flags > environment > config file > defaults. The keys are documented in docs/config.md;
docs/config.example.toml is a complete sample.
"""

from __future__ import annotations

import os
import platform
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gtp5g_op.errors import UsageError
from gtp5g_op.gthulhu.secret import Secret

DEFAULT_API_URL = "http://127.0.0.1:8080"
API_KINDS = ("auto", "legacy", "manager")
DEFAULT_MANAGER_PRIORITY = 10  # the Gthulhu UI's default; v1.x boosts every priority > 0 alike
DEFAULT_DEADLINE = 10.0  # seconds one API call may take, retries included
DEFAULT_MAX_RESPONSE = 4 << 20  # bytes of one API answer that are read
PASSWORD_ENV = "GTP5G_OP_PASSWORD"
_MAX_PASSWORD_FILE = 4096
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|K|KB|KiB|M|MB|MiB|G|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
DEFAULT_MATCH = r"^(nr-gnb|nr-ue)$"
DEFAULT_EXECUTION_TIME_NS = 20_000_000  # 20 ms, what the first lab deployment pushed
DEFAULT_INTERVAL = 10.0
ENV_PREFIX = "GTP5G_OP_"

_UNITS_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s)?\s*$")


def parse_duration_ns(value: str | float) -> int:
    """``"20ms"``, ``"1.5s"``, ``"500us"``, ``"100ns"`` or a bare number of nanoseconds → ns."""
    if isinstance(value, bool):
        raise UsageError(f"execution time {value!r} is not a duration", "write it like 20ms, 1.5s or 500us")
    if isinstance(value, (int, float)):
        if value < 0:
            raise UsageError(f"execution time {value} is negative", "give a positive duration such as 20ms")
        return int(value)
    m = _DURATION_RE.match(value)
    if not m:
        raise UsageError(f"execution time {value!r} is not a duration", "write it like 20ms, 1.5s, 500us or 20000000 (ns)")
    return round(float(m.group(1)) * _UNITS_NS[m.group(2) or "ns"])


def _positive_duration(value: str | float, what: str) -> int:
    ns = parse_duration_ns(value)
    if ns <= 0:
        raise UsageError(f"{what} {value!r} is not a time slice", "give a positive duration such as 20ms")
    return ns


def format_duration_ns(ns: int) -> str:
    """Nanoseconds in the largest unit that keeps the number readable: ``20000000`` → ``20 ms``."""
    for unit, size in (("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)):
        if ns >= size:
            return f"{ns / size:g} {unit}"
    return f"{ns} ns"


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{what}={value!r} is not a boolean", "use true or false")


def _float(value: Any, what: str, minimum: float = 0.0) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what}={value!r} is not a number", f"give a number of seconds for {what}") from None
    if number <= minimum:
        raise UsageError(f"{what}={value!r} is too small", f"give a value above {minimum:g}")
    return number


def _int(value: Any, what: str, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"{what}={value!r} is not an integer", f"give a whole number from {minimum} to {maximum}")
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{what}={value!r} is not an integer", f"give a whole number from {minimum} to {maximum}") from None
    if not minimum <= number <= maximum:
        raise UsageError(f"{what}={number} is out of range", f"give a whole number from {minimum} to {maximum}")
    return number


def _size(value: Any, what: str) -> int:
    """``4194304``, ``"4MiB"``, ``"512 KiB"`` → bytes, from 1 KiB to 1 GiB."""
    m = _SIZE_RE.match(str(value)) if not isinstance(value, bool) and isinstance(value, (int, str)) else None
    if not m:
        raise UsageError(f"{what}={value!r} is not a size", "write it like 4MiB, 512KiB or a number of bytes")
    size = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
    if not 1 << 10 <= size <= 1 << 30:
        raise UsageError(f"{what}={value!r} is out of range", "give a size from 1KiB to 1GiB")
    return size


def http_url(value: Any, what: str, flag: str) -> str:
    """An http(s) base URL with a host and a valid port, no credentials, query or fragment; a UsageError otherwise."""
    text = str(value).strip().rstrip("/")
    example = "http://127.0.0.1:8080"
    if not text.isprintable() or " " in text:
        raise UsageError(f"{what} {text!r} contains spaces or control characters", f"give {flag} like {example}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"{what} {text!r} is not a valid URL: {exc}", f"give {flag} like {example} (ports 1-65535)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{what} {text!r} is not an http(s) URL", f"give {flag} like {example}")
    if parts.username is not None or parts.password is not None:
        shown = f"{parts.scheme}://***@{parts.hostname}"
        raise UsageError(
            f"{what} {shown}... carries credentials in the URL",
            "remove them: give --username and GTP5G_OP_PASSWORD or --password-file",
        )
    if port == 0:
        raise UsageError(f"{what} {text!r} has port 0", f"give {flag} with a port from 1 to 65535")
    if parts.query or parts.fragment:
        raise UsageError(f"{what} {text!r} has a query or fragment", f"give the server's base URL, like {example}")
    return text


def _node_name(value: Any) -> str:
    text = str(value).strip()
    if not text or len(text) > 253 or not text.isprintable() or " " in text:
        raise UsageError(f"node name {text[:60]!r} is not a Kubernetes node name", "give --node-name as in `kubectl get nodes`")
    return text


def _regex(value: str, what: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise UsageError(f"{what} {value!r} is not a valid regular expression: {exc}", "fix the pattern") from None
    return value


@dataclass(frozen=True)
class Rule:
    """Scheduling parameters for targets whose comm matches ``comm`` (a regex, searched)."""

    comm: str
    priority: bool | None = None
    execution_time_ns: int | None = None


@dataclass(frozen=True)
class Policy:
    """Default priority / execution time plus per-target overrides; the first matching override wins."""

    priority: bool = True
    execution_time_ns: int = DEFAULT_EXECUTION_TIME_NS
    overrides: tuple[Rule, ...] = ()
    manager_priority: int = DEFAULT_MANAGER_PRIORITY  # the int a Manager policy carries when priority is on

    def resolve(self, comm: str) -> tuple[bool, int]:
        """``(priority, execution_time_ns)`` for a target with this comm."""
        for rule in self.overrides:
            if re.search(rule.comm, comm):
                return (
                    self.priority if rule.priority is None else rule.priority,
                    self.execution_time_ns if rule.execution_time_ns is None else rule.execution_time_ns,
                )
        return self.priority, self.execution_time_ns


# The selector strategy the Gthulhu API server ships in its default configuration. GET returns its
# per-PID expansion without ``command_regex``; a merge uses this to put the regex back (see docs/api.md).
DEFAULT_KNOWN_SELECTORS: tuple[dict, ...] = (
    {
        "priority": True,
        "execution_time": DEFAULT_EXECUTION_TIME_NS,
        "selectors": [{"key": "app", "value": "ueransim-macvlan"}],
        "command_regex": "nr-gnb|nr-ue|ping",
    },
)


@dataclass(frozen=True)
class Settings:
    """Everything the API client, the pusher and the watch need, already validated."""

    api_url: str = DEFAULT_API_URL
    api_kind: str = "auto"
    public_key: Path | None = None
    username: str | None = None
    password: Secret | None = None  # from GTP5G_OP_PASSWORD only (never a file key or a flag)
    password_file: Path | None = None
    node_name: str = field(default_factory=platform.node)
    dm_url: str | None = None
    ca_bundle: Path | None = None
    insecure: bool = False
    timeout: float = 5.0
    deadline: float = DEFAULT_DEADLINE
    max_response: int = DEFAULT_MAX_RESPONSE
    match: str = DEFAULT_MATCH
    exe_allow: tuple[str, ...] = ()
    threads: bool = True
    policy: Policy = field(default_factory=Policy)
    interval: float = DEFAULT_INTERVAL
    debounce: float = 0.2
    replace: bool = False
    state_dir: Path | None = None
    known_selectors: tuple[dict, ...] = DEFAULT_KNOWN_SELECTORS

    def public_key_pem(self) -> bytes:
        """The PEM bytes of ``public_key``; a UsageError when it is unset or unreadable."""
        if self.public_key is None:
            raise UsageError(
                "no Gthulhu public key given",
                "pass --public-key FILE, set GTP5G_OP_PUBLIC_KEY or api.public_key in the config file",
            )
        try:
            return self.public_key.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read public key {self.public_key}: {exc.strerror}", "check the path") from None

    def manager_password(self) -> Secret:
        """The Manager password: GTP5G_OP_PASSWORD, else the first line of the password file; a UsageError otherwise."""
        if self.password_file is None:
            if self.password:
                return self.password
            raise UsageError(
                "no password for the Gthulhu Manager",
                f"set {PASSWORD_ENV}, or give --password-file FILE (e.g. a mounted Kubernetes Secret)",
            )
        path = self.password_file
        try:
            with path.open("rb") as fh:
                data = fh.read(_MAX_PASSWORD_FILE + 1)
        except IsADirectoryError:
            raise UsageError(f"password file {path} is a directory", "give the file that holds the password") from None
        except OSError as exc:
            raise UsageError(f"cannot read password file {path}: {exc.strerror}", "check the path and its mode") from None
        if len(data) > _MAX_PASSWORD_FILE:
            raise UsageError(f"password file {path} is larger than {_MAX_PASSWORD_FILE} bytes", "give the file that holds only the password")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"password file {path} is not UTF-8 text", "give the file that holds only the password") from None
        password = text.split("\n", 1)[0].rstrip("\r")
        if not password:
            raise UsageError(f"password file {path} is empty", "write the password on its first line")
        return Secret(password)


# name -> (toml section, toml key); flags and env use the name.
_FILE_KEYS = {
    "api_url": ("api", "url"),
    "api_kind": ("api", "kind"),
    "public_key": ("api", "public_key"),
    "username": ("api", "username"),
    "password_file": ("api", "password_file"),
    "node_name": ("api", "node_name"),
    "dm_url": ("api", "dm_url"),
    "ca_bundle": ("api", "ca_bundle"),
    "insecure": ("api", "insecure"),
    "timeout": ("api", "timeout"),
    "deadline": ("api", "deadline"),
    "max_response": ("api", "max_response"),
    "match": ("targets", "match"),
    "exe_allow": ("targets", "exe_allow"),
    "threads": ("targets", "threads"),
    "priority": ("policy", "priority"),
    "execution_time": ("policy", "execution_time"),
    "manager_priority": ("policy", "manager_priority"),
    "interval": ("push", "interval"),
    "debounce": ("push", "debounce"),
    "replace": ("push", "replace"),
    "state_dir": ("push", "state_dir"),
}
_ENV_NAMES = {name: ENV_PREFIX + name.upper() for name in _FILE_KEYS} | {"api_kind": ENV_PREFIX + "API"}


def _read_file(path: Path) -> dict:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist", "check --config / GTP5G_OP_CONFIG") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}", "see docs/config.md") from None


def _overrides(items: Any, path: Path | None) -> tuple[Rule, ...]:
    if not isinstance(items, list):
        raise UsageError(f"{path}: policy.override must be an array of tables", "write [[policy.override]]")
    rules = []
    for item in items:
        if not isinstance(item, dict) or "comm" not in item:
            raise UsageError(f"{path}: each [[policy.override]] needs a comm regex", "add comm = \"^nr-gnb$\"")
        unknown = set(item) - {"comm", "priority", "execution_time"}
        if unknown:
            raise UsageError(f"{path}: unknown key(s) in [[policy.override]]: {', '.join(sorted(unknown))}", "see docs/config.md")
        rules.append(
            Rule(
                comm=_regex(str(item["comm"]), "policy.override comm"),
                priority=None if "priority" not in item else _bool(item["priority"], "policy.override priority"),
                execution_time_ns=None if "execution_time" not in item
                else _positive_duration(item["execution_time"], "policy.override execution_time"),
            )
        )
    return tuple(rules)


def _known_selectors(items: Any, path: Path | None) -> tuple[dict, ...]:
    if not isinstance(items, list):
        raise UsageError(f"{path}: push.known_selectors must be an array of tables", "write [[push.known_selectors]]")
    out = []
    for item in items:
        sels = item.get("selectors") if isinstance(item, dict) else None
        if not isinstance(sels, list) or not sels or not all(isinstance(s, dict) and {"key", "value"} <= set(s) for s in sels):
            raise UsageError(f"{path}: each known selector strategy needs selectors = [{{key=..., value=...}}]", "see docs/config.md")
        entry = {
            "priority": _bool(item.get("priority", True), "known_selectors priority"),
            "execution_time": parse_duration_ns(item.get("execution_time", DEFAULT_EXECUTION_TIME_NS)),
            "selectors": [{"key": str(s["key"]), "value": str(s["value"])} for s in sels],
        }
        if item.get("command_regex"):
            entry["command_regex"] = str(item["command_regex"])
        out.append(entry)
    return tuple(out)


def load_settings(config: str | Path | None = None, env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
    """Merge defaults, the TOML ``config`` file (or ``GTP5G_OP_CONFIG``), ``env`` and ``flags``.

    ``flags`` use the names of ``_FILE_KEYS`` (``api_url``, ``public_key``, ``priority``,
    ``execution_time``, ...); a flag whose value is None was not given and does not override.
    """
    env = os.environ if env is None else env
    config = config or env.get(ENV_PREFIX + "CONFIG") or None
    path = Path(config) if config else None
    doc = _read_file(path) if path else {}

    raw: dict[str, Any] = {}
    known_sections = {"api", "targets", "policy", "push"}
    unknown = set(doc) - known_sections
    if unknown:
        raise UsageError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}", "see docs/config.md")
    section_keys: dict[str, set[str]] = {}
    for name, (section, key) in _FILE_KEYS.items():
        section_keys.setdefault(section, set()).add(key)
        if key in doc.get(section, {}):
            raw[name] = doc[section][key]
    if "password" in doc.get("api", {}):
        raise UsageError(f"{path}: a password does not belong in the config file",
                         f"put it in a file of its own (api.password_file) or in {PASSWORD_ENV}")
    for section, body in doc.items():
        extra = set(body) - section_keys[section] - {"override", "known_selectors"}
        if extra:
            raise UsageError(f"{path}: unknown key(s) in [{section}]: {', '.join(sorted(extra))}", "see docs/config.md")
    for name, variable in _ENV_NAMES.items():
        value = env.get(variable)
        if value not in (None, ""):
            raw[name] = value
    if "node_name" not in raw and env.get("NODE_NAME"):  # the DaemonSet's downward-API variable
        raw["node_name"] = env["NODE_NAME"]
    raw.update({k: v for k, v in flags.items() if v is not None})
    unknown_flags = set(raw) - set(_FILE_KEYS)
    if unknown_flags:
        raise TypeError(f"load_settings got unknown setting(s): {sorted(unknown_flags)}")

    base = Settings()
    policy = Policy(
        priority=_bool(raw["priority"], "priority") if "priority" in raw else base.policy.priority,
        execution_time_ns=_positive_duration(raw["execution_time"], "execution time")
        if "execution_time" in raw else base.policy.execution_time_ns,
        overrides=_overrides(doc["policy"]["override"], path) if "override" in doc.get("policy", {}) else (),
        manager_priority=_int(raw["manager_priority"], "manager_priority", 1, 2**31 - 1)
        if "manager_priority" in raw else base.policy.manager_priority,
    )
    exe_allow = raw.get("exe_allow", ())
    if isinstance(exe_allow, str):
        exe_allow = [p for p in re.split(r"[,:]", exe_allow) if p]
    kind = str(raw.get("api_kind", base.api_kind)).strip().lower()
    if kind not in API_KINDS:
        raise UsageError(f"API kind {kind!r} is not one of {', '.join(API_KINDS)}", "give --api auto, legacy or manager")
    # An explicit --password-file beats a GTP5G_OP_PASSWORD left in the environment.
    password = None if flags.get("password_file") is not None else env.get(PASSWORD_ENV) or None
    return replace(
        base,
        api_url=http_url(raw.get("api_url", base.api_url), "API URL", "--api-url"),
        api_kind=kind,
        public_key=Path(raw["public_key"]).expanduser() if raw.get("public_key") else None,
        username=str(raw["username"]) if raw.get("username") else None,
        password=Secret(password) if password else None,
        password_file=Path(raw["password_file"]).expanduser() if raw.get("password_file") else None,
        node_name=_node_name(raw["node_name"]) if raw.get("node_name") else base.node_name,
        dm_url=http_url(raw["dm_url"], "Decision Maker URL", "--dm-url") if raw.get("dm_url") else None,
        deadline=_float(raw.get("deadline", base.deadline), "deadline"),
        max_response=_size(raw.get("max_response", base.max_response), "max_response"),
        ca_bundle=Path(raw["ca_bundle"]).expanduser() if raw.get("ca_bundle") else None,
        insecure=_bool(raw.get("insecure", False), "insecure"),
        timeout=_float(raw.get("timeout", base.timeout), "timeout"),
        match=_regex(str(raw.get("match", base.match)), "target match"),
        exe_allow=tuple(str(p) for p in exe_allow),
        threads=_bool(raw.get("threads", base.threads), "threads"),
        policy=policy,
        interval=_float(raw.get("interval", base.interval), "interval"),
        debounce=_float(raw.get("debounce", base.debounce), "debounce", minimum=-1e-9),
        replace=_bool(raw.get("replace", False), "replace"),
        state_dir=Path(raw["state_dir"]).expanduser() if raw.get("state_dir") else None,
        known_selectors=_known_selectors(doc["push"]["known_selectors"], path)
        if "known_selectors" in doc.get("push", {})
        else base.known_selectors,
    )
