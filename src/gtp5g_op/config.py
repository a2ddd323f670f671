"""Settings from a TOML file, GTP5G_OP_* environment variables and command-line flags.

Precedence: flags > environment > config file > defaults. The keys are documented in docs/config.md;
docs/config.example.toml is a complete sample.
"""

from __future__ import annotations

import math
import os
import platform
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gtp5g_op import userfiles
from gtp5g_op.errors import UsageError
from gtp5g_op.gthulhu.secret import Secret

DEFAULT_API_URL = "http://127.0.0.1:8080"
DEFAULT_MATCH = r"^(nr-gnb|nr-ue)$"
DEFAULT_EXECUTION_TIME_NS = 20_000_000  # 20 ms, what the first lab deployment pushed
DEFAULT_INTERVAL = 10.0
MIN_INTERVAL = 1.0  # re-sending the whole set more often only loads the API (1e-300 made the pusher spin)
ENV_PREFIX = "GTP5G_OP_"
API_KINDS = ("auto", "legacy", "manager")
DEFAULT_MANAGER_PRIORITY = 10  # the Gthulhu UI's default; v1.x boosts every priority > 0 alike
DEFAULT_DEADLINE = 10.0  # seconds one API call may take, retries included
DEFAULT_MAX_RESPONSE = 4 << 20  # bytes of one API answer that are read
PASSWORD_ENV = "GTP5G_OP_PASSWORD"
_MAX_PASSWORD_FILE = 4096
_SIZE_RE = re.compile(r"\s*([0-9]{1,12})\s*(B|K|KB|KiB|M|MB|MiB|G|GB|GiB)?\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
MAX_DURATION_NS = 2**63 - 1  # what a signed 64-bit nanosecond field (Go's time.Duration) holds

_UNITS_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s)?\s*\Z")


def finite_number(value: Any, what: str, minimum: float = 0.0, maximum: float = 1e9, *,
                  min_open: bool = True) -> float:
    """``value`` (a number or its text) as a float in range; nan, inf and booleans are refused.

    ``minimum`` is excluded when ``min_open`` (the default: "more than 0"), included otherwise.
    """
    if isinstance(value, bool):
        raise UsageError(f"{what}={value!r} is not a number", f"give a number for {what}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{what}={value!r} is not a number", f"give a number for {what}") from None
    if not math.isfinite(number):
        raise UsageError(f"{what}={value!r} is not a finite number", f"give a number such as 1 or 0.5 for {what}")
    if number < minimum or (min_open and number == minimum):
        raise UsageError(f"{what}={value!r} is too small",
                         f"give a value {'above' if min_open else 'of at least'} {minimum:g} for {what}")
    if number > maximum:
        raise UsageError(f"{what}={value!r} is too large", f"give a value of at most {maximum:g} for {what}")
    return number


def parse_duration_ns(value: str | float, what: str = "execution time") -> int:
    """``"20ms"``, ``"1.5s"``, ``"500us"``, ``"100ns"`` or a bare number of nanoseconds → ns."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UsageError(f"{what} {value!r} is not a duration", "write it like 20ms, 1.5s or 500us")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{what} {value} is not a finite duration", "give a duration such as 20ms")
        if value < 0:
            raise UsageError(f"{what} {value} is negative", "give a positive duration such as 20ms")
        ns = int(value)
    else:
        m = _DURATION_RE.match(value)
        if not m:
            raise UsageError(f"{what} {value!r} is not a duration", "write it like 20ms, 1.5s, 500us or 20000000 (ns)")
        ns = round(float(m.group(1)) * _UNITS_NS[m.group(2) or "ns"]) if len(m.group(1)) < 30 else MAX_DURATION_NS + 1
    if ns > MAX_DURATION_NS:
        raise UsageError(f"{what} {value!r} is too long", "give a duration below 292 years, such as 20ms")
    return ns


def format_duration_ns(ns: int) -> str:
    """Nanoseconds in the largest unit that keeps the number readable: ``20000000`` → ``20 ms``."""
    for unit, size in (("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)):
        if ns >= size:
            return f"{ns / size:g} {unit}"
    return f"{ns} ns"


# --- typed values ---------------------------------------------------------------------------------
# Every setting is converted by one function of its type. A converter gets the raw value, the name it
# was given under (file key, env variable or flag) and whether it came as text (environment: always a
# string, parsed) or typed (a TOML value or a flag: its type must already be right).


def _str(value: Any, what: str, text: bool) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{what} = {value!r} is not a string", f"write {what} as a quoted string")
    if "\0" in value:
        raise UsageError(f"{what} contains a NUL character", f"remove it from {what}")
    return value


def _bool(value: Any, what: str, text: bool = True) -> bool:
    if isinstance(value, bool):
        return value
    if text and isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
    raise UsageError(f"{what}={value!r} is not a boolean", "use true or false")


def _seconds(minimum: float, maximum: float, min_open: bool = True) -> Callable[[Any, str, bool], float]:
    def convert(value: Any, what: str, text: bool) -> float:
        if not text and not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UsageError(f"{what} = {value!r} is not a number", f"give {what} a number of seconds, e.g. 5")
        return finite_number(value, what, minimum, maximum, min_open=min_open)

    return convert


def _path(value: Any, what: str, text: bool) -> Path | None:
    if value == "":
        return None
    path = value if isinstance(value, Path) else Path(_str(value, what, text))  # a flag: already a Path
    try:
        return path.expanduser()
    except RuntimeError:  # ~name of a user this host does not have
        raise UsageError(f"{what} = {str(path)!r}: no such user's home directory",
                         f"give {what} an absolute path") from None


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
        raise UsageError(
            f"{what} {parts.scheme}://***@{parts.hostname}... carries credentials in the URL",
            "remove them: give --username and GTP5G_OP_PASSWORD or --password-file",
        )
    if port == 0:
        raise UsageError(f"{what} {text!r} has port 0", f"give {flag} with a port from 1 to 65535")
    if parts.query or parts.fragment:
        raise UsageError(f"{what} {text!r} has a query or fragment", f"give the server's base URL, like {example}")
    return text


def _url(value: Any, what: str, text: bool) -> str:
    return http_url(_str(value, what, text), "API URL", "--api-url")


def _dm_url(value: Any, what: str, text: bool) -> str:
    return http_url(_str(value, what, text), "Decision Maker URL", "--dm-url")


def _api_kind(value: Any, what: str, text: bool) -> str:
    kind = _str(value, what, text).strip().lower()
    if kind not in API_KINDS:
        raise UsageError(f"{what} = {value!r} is not one of {', '.join(API_KINDS)}", "give --api auto, legacy or manager")
    return kind


def _node_name(value: Any, what: str, text: bool) -> str:
    name = _str(value, what, text).strip()
    if not name or len(name) > 253 or not name.isprintable() or " " in name:
        raise UsageError(f"{what} = {name[:60]!r} is not a Kubernetes node name", "give --node-name as `kubectl get nodes` shows it")
    return name


def _priority_level(value: Any, what: str, text: bool) -> int:
    """A Manager policy's priority: a whole number above 0 (v1.x boosts every value above 0)."""
    if isinstance(value, str) and text and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
        raise UsageError(f"{what} = {value!r} is not a whole number from 1 to {2**31 - 1}", f"give {what} like 10")
    return value


def _size(value: Any, what: str, text: bool) -> int:
    """``4194304``, ``"4MiB"``, ``"512 KiB"`` → bytes, from 1 KiB to 1 GiB."""
    m = _SIZE_RE.match(str(value)) if not isinstance(value, bool) and isinstance(value, (int, str)) else None
    if not m:
        raise UsageError(f"{what} = {value!r} is not a size", "write it like 4MiB, 512KiB or a number of bytes")
    size = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
    if not 1 << 10 <= size <= 1 << 30:
        raise UsageError(f"{what} = {value!r} is out of range", "give a size from 1KiB to 1GiB")
    return size


def _regex(value: Any, what: str, text: bool = False) -> str:
    value = _str(value, what, text)
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as exc:
        raise UsageError(f"{what} {value!r} is not a valid regular expression: {exc}", "fix the pattern") from None
    return value


def _target_match(value: Any, what: str, text: bool = False) -> str:
    """The target regex; refused when it matches an empty comm (``''``, ``.*``): it would select anything."""
    value = _regex(value, what, text)
    if re.fullmatch(value, ""):
        raise UsageError(f"{what} {value!r} matches an empty name, so it would select every process",
                         "give the comms to target, e.g. --match '^(nr-gnb|nr-ue)$'")
    return value


def _duration(value: Any, what: str, text: bool) -> int:
    return parse_duration_ns(value, what)


def time_slice_ns(value: Any, what: str = "execution time", text: bool = True) -> int:
    """A scheduling time slice: a duration above 0 (a 0 ns slice is no slice)."""
    ns = parse_duration_ns(value, what)
    if ns <= 0:
        raise UsageError(f"{what} {value!r} is not a time slice", "give a positive duration such as 20ms")
    return ns


def _str_list(value: Any, what: str, text: bool) -> tuple[str, ...]:
    """A list of strings; from text, comma (or colon) separated; a single string is a list of one."""
    if isinstance(value, str):
        return tuple(p.strip() for p in re.split(r"[,:]", value) if p.strip()) if text else (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{what} = {value!r} is not a list of strings", f'write {what} = ["...", "..."]')
    return tuple(_str(v, what, text) for v in value)


def check_exe_patterns(patterns: Any, what: str = "--exe-allow") -> tuple[str, ...]:
    """Absolute executable path patterns; a relative one (``*/nr-gnb``) could be met anywhere: refused."""
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.startswith("/") or "\0" in pattern:
            raise UsageError(f"{what} pattern {pattern!r} is not an absolute path",
                             "give the executable's full path, e.g. /opt/UERANSIM/build/nr-gnb ('*' matches "
                             "within one directory level)")
    return tuple(patterns)


def _exe_patterns(value: Any, what: str, text: bool) -> tuple[str, ...]:
    return check_exe_patterns(_str_list(value, what, text), what)


def _uid_list(value: Any, what: str, text: bool) -> tuple[int, ...]:
    """User ids: integers 0..4294967294 (a list, or comma separated text)."""
    items = re.split(r"[,\s]+", value.strip()) if text and isinstance(value, str) else value
    if isinstance(items, int) and not isinstance(items, bool):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise UsageError(f"{what} = {value!r} is not a list of user ids", f"write {what} = [0, 1000]")
    uids = []
    for item in items:
        if isinstance(item, str) and text and item.isascii() and item.isdigit():
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < 2**32 - 1:
            raise UsageError(f"{what}: {item!r} is not a user id", "give numeric uids from 0 to 4294967294")
        uids.append(item)
    return tuple(uids)


# name -> (toml section, toml key, converter); flags use the name, the environment GTP5G_OP_<NAME>.
# Issues adding settings add a row here and a field to Settings; load_settings needs no change.
Converter = Callable[[Any, str, bool], Any]
KEYS: dict[str, tuple[str, str, Converter]] = {
    "api_url": ("api", "url", _url),
    "api_kind": ("api", "kind", _api_kind),
    "public_key": ("api", "public_key", _path),
    "username": ("api", "username", _str),
    "password_file": ("api", "password_file", _path),
    "node_name": ("api", "node_name", _node_name),
    "dm_url": ("api", "dm_url", _dm_url),
    "ca_bundle": ("api", "ca_bundle", _path),
    "insecure": ("api", "insecure", _bool),
    "timeout": ("api", "timeout", _seconds(0.0, 3600.0)),
    "deadline": ("api", "deadline", _seconds(0.0, 3600.0)),
    "max_response": ("api", "max_response", _size),
    "match": ("targets", "match", _target_match),
    "exe_allow": ("targets", "exe_allow", _exe_patterns),
    "allow_user_writable_exe": ("targets", "allow_user_writable_exe", _bool),
    "uid_allow": ("targets", "uid_allow", _uid_list),
    "threads": ("targets", "threads", _bool),
    "priority": ("policy", "priority", _bool),
    "execution_time": ("policy", "execution_time", time_slice_ns),
    "manager_priority": ("policy", "manager_priority", _priority_level),
    "interval": ("push", "interval", _seconds(MIN_INTERVAL, 86400.0, min_open=False)),
    "debounce": ("push", "debounce", _seconds(0.0, 60.0, min_open=False)),
    "replace": ("push", "replace", _bool),
    "state_dir": ("push", "state_dir", _path),
}
# Environment variables not named GTP5G_OP_<NAME>, and the ones read when that is unset.
ENV_NAMES = {"api_kind": ENV_PREFIX + "API"}
ENV_FALLBACKS = {"node_name": "NODE_NAME"}  # the DaemonSet's downward-API variable
# Keys holding arrays of tables, read by their own functions below.
_TABLE_ARRAYS = {"policy": {"override"}, "push": {"known_selectors"}}


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
    allow_user_writable_exe: bool = False
    uid_allow: tuple[int, ...] = ()
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
        text = userfiles.read_text(self.public_key, "public key", limit=64 << 10,
                                   fix="check --public-key, GTP5G_OP_PUBLIC_KEY or api.public_key: the Gthulhu API "
                                   "server's RSA public key (PEM)")
        return text.encode()

    def ca_bundle_path(self) -> str | None:
        """``ca_bundle`` checked (a PEM file, or a directory of certificates as requests takes it)."""
        if self.ca_bundle is None:
            return None
        fix = "give the PEM file of the CA that signed the API's certificate"
        path = userfiles.check(self.ca_bundle, "CA bundle", kinds={userfiles.REGULAR, userfiles.DIRECTORY}, fix=fix)
        if not path.is_dir():
            userfiles.read_text(path, "CA bundle", limit=8 << 20, fix=fix)  # PEM is text: refuse binary data now
        return str(path)

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
        data = userfiles.read_bytes(path, "password file", limit=_MAX_PASSWORD_FILE,
                                    fix="give --password-file the file that holds the Manager password (first line)")
        try:  # decoded here: userfiles' own message would quote a byte of the password
            password = data.decode("utf-8").split("\n", 1)[0].rstrip("\r")
        except UnicodeDecodeError:
            raise UsageError(f"password file {path} is not UTF-8 text", "write the password as UTF-8 text") from None
        if not password:
            raise UsageError(f"password file {path} is empty", "write the password on its first line")
        return Secret(password)


def _read_file(path: Path) -> dict:
    text = userfiles.read_text(path, "config file", fix="check --config / GTP5G_OP_CONFIG (see docs/config.md)")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}", "see docs/config.md") from None


def _table_array(items: Any, where: str, example: str) -> list[dict]:
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise UsageError(f"{where} must be an array of tables", f"write {example}")
    return items


def _overrides(items: Any, where: str) -> tuple[Rule, ...]:
    rules = []
    for item in _table_array(items, where, "[[policy.override]]"):
        if "comm" not in item:
            raise UsageError(f"{where}: each [[policy.override]] needs a comm regex", "add comm = \"^nr-gnb$\"")
        unknown = set(item) - {"comm", "priority", "execution_time"}
        if unknown:
            raise UsageError(f"{where}: unknown key(s) in [[policy.override]]: {', '.join(sorted(unknown))}", "see docs/config.md")
        rules.append(
            Rule(
                comm=_regex(item["comm"], f"{where} comm"),
                priority=None if "priority" not in item else _bool(item["priority"], f"{where} priority", False),
                execution_time_ns=None if "execution_time" not in item
                else time_slice_ns(item["execution_time"], f"{where} execution_time"),
            )
        )
    return tuple(rules)


def _known_selectors(items: Any, where: str) -> tuple[dict, ...]:
    out = []
    for item in _table_array(items, where, "[[push.known_selectors]]"):
        sels = item.get("selectors")
        if not isinstance(sels, list) or not sels or not all(
            isinstance(s, dict) and {"key", "value"} <= set(s) and isinstance(s["key"], str) and isinstance(s["value"], str)
            for s in sels
        ):
            raise UsageError(f"{where}: each known selector strategy needs selectors = [{{key=\"...\", value=\"...\"}}]",
                             "see docs/config.md")
        unknown = set(item) - {"priority", "execution_time", "selectors", "command_regex"}
        if unknown:
            raise UsageError(f"{where}: unknown key(s) in [[push.known_selectors]]: {', '.join(sorted(unknown))}",
                             "see docs/config.md")
        entry = {
            "priority": _bool(item.get("priority", True), f"{where} priority", False),
            "execution_time": parse_duration_ns(item.get("execution_time", DEFAULT_EXECUTION_TIME_NS),
                                                f"{where} execution_time"),
            "selectors": [{"key": s["key"], "value": s["value"]} for s in sels],
        }
        if item.get("command_regex"):
            entry["command_regex"] = _regex(item["command_regex"], f"{where} command_regex")
        out.append(entry)
    return tuple(out)


def _file_values(doc: dict, path: Path | None) -> tuple[dict[str, tuple[Any, str]], dict[str, Any]]:
    """(name -> (value, where)) for the plain keys of the file, and the arrays of tables by section.key."""
    sections: dict[str, dict[str, str]] = {}
    for name, (section, key, _) in KEYS.items():
        sections.setdefault(section, {})[key] = name
    unknown = set(doc) - set(sections)
    if unknown:
        raise UsageError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}", "see docs/config.md")
    values: dict[str, tuple[Any, str]] = {}
    tables: dict[str, Any] = {}
    for section, body in doc.items():
        if not isinstance(body, dict):
            raise UsageError(f"{path}: {section} = {body!r} is not a table", f"write it as a [{section}] section")
        extra = set(body) - set(sections[section]) - _TABLE_ARRAYS.get(section, set())
        if extra:
            raise UsageError(f"{path}: unknown key(s) in [{section}]: {', '.join(sorted(extra))}", "see docs/config.md")
        for key, value in body.items():
            if key in sections[section]:
                values[sections[section][key]] = (value, f"{path}: {section}.{key}")
            else:
                tables[f"{section}.{key}"] = (value, f"{path}: {section}.{key}")
    return values, tables


def load_settings(config: str | Path | None = None, env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
    """Merge defaults, the TOML ``config`` file (or ``GTP5G_OP_CONFIG``), ``env`` and ``flags``.

    ``flags`` use the names of :data:`KEYS` (``api_url``, ``public_key``, ``priority``,
    ``execution_time``, ...); a flag whose value is None was not given and does not override. Every value
    is type-checked; a wrong one is a UsageError naming where it came from.
    """
    env = os.environ if env is None else env
    config = config or env.get(ENV_PREFIX + "CONFIG") or None
    path = Path(config) if config else None
    doc = _read_file(path) if path else {}

    unknown_flags = set(flags) - set(KEYS)
    if unknown_flags:
        raise TypeError(f"load_settings got unknown setting(s): {sorted(unknown_flags)}")
    # name -> (raw value, where it came from, given as text)
    if isinstance(doc.get("api"), dict) and "password" in doc["api"]:
        raise UsageError(f"{path}: a password does not belong in the config file",
                         f"put it in a file of its own (api.password_file) or in {PASSWORD_ENV}")
    file_values, tables = _file_values(doc, path)
    raw: dict[str, tuple[Any, str, bool]] = {k: (v, where, False) for k, (v, where) in file_values.items()}
    for name in KEYS:
        for variable in (ENV_NAMES.get(name, ENV_PREFIX + name.upper()), ENV_FALLBACKS.get(name)):
            value = env.get(variable) if variable else None
            if value not in (None, ""):
                raw[name] = (value, variable, True)
                break
    for name, value in flags.items():
        if value is not None:
            raw[name] = (value, "--" + name.replace("_", "-"), isinstance(value, str))
    typed = {name: KEYS[name][2](value, where, text) for name, (value, where, text) in raw.items()}

    base = Settings()
    policy = Policy(
        priority=typed.get("priority", base.policy.priority),
        execution_time_ns=typed.get("execution_time", base.policy.execution_time_ns),
        overrides=_overrides(*tables["policy.override"]) if "policy.override" in tables else (),
        manager_priority=typed.get("manager_priority", base.policy.manager_priority),
    )
    fields = {name: value for name, value in typed.items() if name not in ("priority", "execution_time", "manager_priority")}
    # An explicit --password-file beats a GTP5G_OP_PASSWORD left in the environment.
    password = None if flags.get("password_file") is not None else env.get(PASSWORD_ENV) or None
    return replace(
        base,
        **fields,
        password=Secret(password) if password else None,
        policy=policy,
        known_selectors=_known_selectors(*tables["push.known_selectors"])
        if "push.known_selectors" in tables
        else base.known_selectors,
    )
