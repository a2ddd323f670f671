"""Settings: defaults, TOML file, environment and flags, in that order of strength."""

from __future__ import annotations

from pathlib import Path

import pytest

from gtp5g_op.config import (
    DEFAULT_KNOWN_SELECTORS,
    Policy,
    Rule,
    Settings,
    format_duration_ns,
    load_settings,
    parse_duration_ns,
)
from gtp5g_op.errors import UsageError

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "config.example.toml"


@pytest.mark.parametrize(
    "text,ns",
    [("20ms", 20_000_000), ("1.5s", 1_500_000_000), ("500us", 500_000), ("20000000", 20_000_000), ("100ns", 100), (" 2 ms ", 2_000_000)],
)
def test_parse_duration(text, ns):
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize("bad", ["", "fast", "-1ms", "1h", "1.2.3s"])
def test_parse_duration_rejects(bad):
    with pytest.raises(UsageError):
        parse_duration_ns(bad)


def test_format_duration():
    assert [format_duration_ns(n) for n in (20_000_000, 1_500_000_000, 500_000, 12)] == ["20 ms", "1.5 s", "500 us", "12 ns"]


def test_defaults():
    s = load_settings(env={})
    assert s == Settings()
    assert s.api_url == "http://127.0.0.1:8080" and s.public_key is None and s.interval == 10.0
    assert s.policy.resolve("nr-gnb") == (True, 20_000_000) and s.match == "^(nr-gnb|nr-ue)$"
    assert s.known_selectors == DEFAULT_KNOWN_SELECTORS


def test_example_file_loads_and_precedence_is_flags_env_file(tmp_path):
    s = load_settings(EXAMPLE, env={})
    assert s.public_key == Path("/etc/gtp5g-op/gthulhu.pub")
    assert s.policy.resolve("nr-gnb") == (True, 10_000_000) and s.policy.resolve("nr-ue") == (True, 20_000_000)
    assert s.known_selectors == DEFAULT_KNOWN_SELECTORS

    env = {"GTP5G_OP_CONFIG": str(EXAMPLE), "GTP5G_OP_API_URL": "http://env:1/", "GTP5G_OP_EXECUTION_TIME": "3ms",
           "GTP5G_OP_EXE_ALLOW": "*/nr-gnb,*/nr-ue", "GTP5G_OP_INSECURE": "yes"}
    s = load_settings(env=env)
    assert s.api_url == "http://env:1" and s.policy.execution_time_ns == 3_000_000 and s.insecure
    assert s.exe_allow == ("*/nr-gnb", "*/nr-ue")
    s = load_settings(env=env, api_url="http://flag:2", execution_time="1ms", priority=False, exe_allow=("/x",), insecure=None)
    assert s.api_url == "http://flag:2" and s.policy == Policy(False, 1_000_000, s.policy.overrides) and s.exe_allow == ("/x",)
    assert s.insecure  # a flag left at None does not override the environment


def test_overrides_first_match_wins():
    policy = Policy(overrides=(Rule("gnb", execution_time_ns=1), Rule("nr-", priority=False)))
    assert policy.resolve("nr-gnb") == (True, 1) and policy.resolve("nr-ue") == (False, 20_000_000)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("[api\nurl=1", "not valid TOML"),
        ("[nope]\nx=1", "unknown section"),
        ("[api]\nulr='x'", "unknown key(s) in [api]: ulr"),
        ("[targets]\nmatch='('", "not a valid regular expression"),
        ("[push]\ninterval=0", "too small"),
        ("[policy]\nexecution_time='soon'", "not a duration"),
        ("[[policy.override]]\npriority=true", "needs a comm regex"),
        ("[api]\nurl='ftp://x'", "not an http(s) URL"),
        ("[[push.known_selectors]]\ncommand_regex='x'", "needs selectors"),
    ],
)
def test_bad_config_is_a_usage_error(tmp_path, text, fragment):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        load_settings(path, env={})
    assert fragment in err.value.message


def test_missing_file_and_key(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_settings(tmp_path / "none.toml", env={})
    with pytest.raises(UsageError, match="no Gthulhu public key"):
        load_settings(env={}).public_key_pem()
    with pytest.raises(UsageError, match="public key .* does not exist"):
        load_settings(env={}, public_key=str(tmp_path / "none.pub")).public_key_pem()
