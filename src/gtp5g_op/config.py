"""Settings from a TOML file, GTP5G_OP_* environment variables and command-line flags.

Precedence: flags > environment > config file > defaults. The keys are documented in docs/config.md;
docs/config.example.toml is a complete sample.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gtp5g_op import userfiles
from gtp5g_op.errors import UsageError

DEFAULT_API_URL = "http://127.0.0.1:8080"
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


def _regex(value: str, what: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise UsageError(f"{what} {value!r} is not a valid regular expression: {exc}", "fix the pattern") from None
    return value


def _target_match(value: str) -> str:
    """The target regex; refused when it matches an empty comm (``''``, ``.*``): it would select anything."""
    _regex(value, "target match")
    if re.fullmatch(value, ""):
        raise UsageError(f"target match {value!r} matches an empty name, so it would select every process",
                         "give the comms to target, e.g. --match '^(nr-gnb|nr-ue)$'")
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
    public_key: Path | None = None
    ca_bundle: Path | None = None
    insecure: bool = False
    timeout: float = 5.0
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


# name -> (toml section, toml key); flags and env use the name.
_FILE_KEYS = {
    "api_url": ("api", "url"),
    "public_key": ("api", "public_key"),
    "ca_bundle": ("api", "ca_bundle"),
    "insecure": ("api", "insecure"),
    "timeout": ("api", "timeout"),
    "match": ("targets", "match"),
    "exe_allow": ("targets", "exe_allow"),
    "threads": ("targets", "threads"),
    "priority": ("policy", "priority"),
    "execution_time": ("policy", "execution_time"),
    "interval": ("push", "interval"),
    "debounce": ("push", "debounce"),
    "replace": ("push", "replace"),
    "state_dir": ("push", "state_dir"),
}
_ENV_NAMES = tuple(_FILE_KEYS)


def _read_file(path: Path) -> dict:
    text = userfiles.read_text(path, "config file", fix="check --config / GTP5G_OP_CONFIG (see docs/config.md)")
    try:
        return tomllib.loads(text)
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
                execution_time_ns=None if "execution_time" not in item else parse_duration_ns(item["execution_time"]),
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
    for section, body in doc.items():
        extra = set(body) - section_keys[section] - {"override", "known_selectors"}
        if extra:
            raise UsageError(f"{path}: unknown key(s) in [{section}]: {', '.join(sorted(extra))}", "see docs/config.md")
    for name in _ENV_NAMES:
        value = env.get(ENV_PREFIX + name.upper())
        if value not in (None, ""):
            raw[name] = value
    raw.update({k: v for k, v in flags.items() if v is not None})
    unknown_flags = set(raw) - set(_FILE_KEYS)
    if unknown_flags:
        raise TypeError(f"load_settings got unknown setting(s): {sorted(unknown_flags)}")

    base = Settings()
    policy = Policy(
        priority=_bool(raw["priority"], "priority") if "priority" in raw else base.policy.priority,
        execution_time_ns=parse_duration_ns(raw["execution_time"]) if "execution_time" in raw else base.policy.execution_time_ns,
        overrides=_overrides(doc["policy"]["override"], path) if "override" in doc.get("policy", {}) else (),
    )
    exe_allow = raw.get("exe_allow", ())
    if isinstance(exe_allow, str):
        exe_allow = [p for p in re.split(r"[,:]", exe_allow) if p]
    url = str(raw.get("api_url", base.api_url)).rstrip("/")
    if not re.match(r"^https?://[^/]+", url):
        raise UsageError(f"API URL {url!r} is not an http(s) URL", "use e.g. http://127.0.0.1:8080")
    return replace(
        base,
        api_url=url,
        public_key=Path(raw["public_key"]).expanduser() if raw.get("public_key") else None,
        ca_bundle=Path(raw["ca_bundle"]).expanduser() if raw.get("ca_bundle") else None,
        insecure=_bool(raw.get("insecure", False), "insecure"),
        timeout=_float(raw.get("timeout", base.timeout), "timeout"),
        match=_target_match(str(raw.get("match", base.match))),
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
