"""Settings: defaults, TOML file, environment and flags, in that order of strength."""

from __future__ import annotations

import json
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
           "GTP5G_OP_EXE_ALLOW": "/opt/*/nr-gnb,/opt/*/nr-ue", "GTP5G_OP_INSECURE": "yes"}
    s = load_settings(env=env)
    assert s.api_url == "http://env:1" and s.policy.execution_time_ns == 3_000_000 and s.insecure
    assert s.exe_allow == ("/opt/*/nr-gnb", "/opt/*/nr-ue")
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


# --- hostile values (issue 11 item 10) -------------------------------------------------------------

@pytest.mark.parametrize(
    "text,fragment",
    [
        ("api = 1", "api = 1 is not a table"),
        ("[targets]\nexe_allow = 5", "targets.exe_allow = 5 is not a list of strings"),
        ("[targets]\nexe_allow = ['/opt/nr-gnb', 5]", "is not a list of strings"),
        ("[api]\nurl = 1", "api.url = 1 is not a string"),
        ("[api]\npublic_key = ['a']", "api.public_key = ['a'] is not a string"),
        ("[api]\ninsecure = 'yes'", "api.insecure='yes' is not a boolean"),
        ("[api]\ntimeout = '5'", "api.timeout = '5' is not a number"),
        ("[api]\ntimeout = nan", "is not a finite number"),
        ("[api]\ntimeout = inf", "is not a finite number"),
        ("[push]\ninterval = -inf", "is not a finite number"),
        ("[push]\ninterval = 1e300", "too large"),
        ("[push]\ndebounce = nan", "is not a finite number"),
        ("[push]\nreplace = 1", "is not a boolean"),
        ("[push]\nstate_dir = 7", "push.state_dir = 7 is not a string"),
        ("[targets]\nmatch = ['x']", "is not a string"),
        ("[targets]\nthreads = 'maybe'", "is not a boolean"),
        ("[policy]\nexecution_time = nan", "not a finite duration"),
        ("[policy]\nexecution_time = inf", "not a finite duration"),
        ("[policy]\nexecution_time = true", "not a duration"),
        ("[policy]\nexecution_time = '99999999999999999999999999999999999s'", "too long"),
        ("[policy]\noverride = 3", "must be an array of tables"),
        ("[[policy.override]]\ncomm = 5", "policy.override comm = 5 is not a string"),
        ("[[policy.override]]\ncomm = 'x'\npriority = 'no'", "is not a boolean"),
        ("[[push.known_selectors]]\nselectors = [{key = 1, value = 'x'}]", "needs selectors"),
        ("[[push.known_selectors]]\nselectors = [{key = 'a', value = 'x'}]\ncommand_regex = 3", "is not a string"),
        ("[[push.known_selectors]]\nselectors = [{key = 'a', value = 'x'}]\nextra = 3", "unknown key(s)"),
        ("[push]\nknown_selectors = 'x'", "must be an array of tables"),
    ],
)
def test_wrong_types_and_non_finite_numbers_are_one_clear_usage_error(tmp_path, text, fragment):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        load_settings(path, env={})
    assert fragment in err.value.message and str(path) in err.value.message
    assert err.value.fix


@pytest.mark.parametrize("name,value", [("INTERVAL", "nan"), ("TIMEOUT", "inf"), ("DEBOUNCE", "-nan"),
                                        ("INTERVAL", "1e999"), ("EXECUTION_TIME", "1e999"), ("TIMEOUT", "0x10"),
                                        ("INSECURE", "maybe"), ("API_URL", "http://a b")])
def test_hostile_environment_values(name, value):
    with pytest.raises(UsageError) as err:
        load_settings(env={f"GTP5G_OP_{name}": value})
    assert f"GTP5G_OP_{name}" in err.value.message or "URL" in err.value.message


@pytest.mark.parametrize("flag,value", [("interval", float("nan")), ("timeout", float("inf")),
                                        ("debounce", float("-inf")), ("execution_time", float("nan")),
                                        ("interval", True), ("exe_allow", 5), ("api_url", 1)])
def test_hostile_flag_values(flag, value):
    with pytest.raises(UsageError):
        load_settings(env={}, **{flag: value})


def test_finite_number_and_cli_flags_refuse_nan_and_inf():
    from click.testing import CliRunner

    from gtp5g_op.cli import main
    from gtp5g_op.config import finite_number

    for bad in ("nan", "inf", "-inf", float("nan"), "1e999", True, None, "x"):
        with pytest.raises(UsageError):
            finite_number(bad, "x")
    assert finite_number("0.5", "x") == 0.5
    runner = CliRunner()
    for args in (["watch", "--replay", "--speed", "nan"], ["watch", "--replay", "--duration", "inf"],
                 ["watch", "--replay", "--interval", "nan"], ["tracer", "selftest", "--timeout", "nan"],
                 ["tracer", "run", "--duration", "inf"]):
        out = runner.invoke(main, args)
        assert out.exit_code == 2 and "finite" in out.output and "Traceback" not in out.output, args


def test_run_watch_refuses_non_finite_options_from_library_callers():
    from gtp5g_op.trace.watch import BUNDLED_SAMPLE, WatchOptions, run_watch

    for field in ("speed", "duration", "interval"):
        with pytest.raises(UsageError, match="not a finite number"):
            run_watch(WatchOptions(replay=BUNDLED_SAMPLE, validate=False, **{field: float("nan")}))


# --- property: any TOML document is Settings or one UsageError, never a traceback ----------------------

from hypothesis import HealthCheck, given, settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gtp5g_op.config import KEYS  # noqa: E402

_KEYS_BY_SECTION: dict[str, list[str]] = {}
for _section, _key, _ in KEYS.values():
    _KEYS_BY_SECTION.setdefault(_section, []).append(_key)
_SECTIONS = sorted(_KEYS_BY_SECTION) * 4 + ["extra"]  # an unknown name now and then
_ARRAYS = {"policy.override": ["comm", "priority", "execution_time"],
           "push.known_selectors": ["selectors", "priority", "execution_time", "command_regex"]}


def _toml_key(k: str) -> str:
    return k if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k) else json.dumps(k, ensure_ascii=False)


def _render(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_key(k)} = {_render(v)}" for k, v in value.items()) + "}"


_scalars = (st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=True, allow_infinity=True)
            | st.sampled_from(["20ms", "1.5s", "^nr-gnb$", "(", "http://x:1", "/opt/nr-gnb", "", "nan", "yes"])
            | st.text(max_size=20))
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["comm", "priority", "execution_time", "selectors", "key", "value",
                                       "command_regex", "x"]), inner, max_size=4),
    max_leaves=8,
)


@st.composite
def toml_documents(draw) -> str:
    """Random documents shaped like a config: known sections and keys (rarely unknown ones), any values."""
    inline, tables = [], []
    for section in draw(st.lists(st.sampled_from(_SECTIONS), max_size=4, unique=True)):
        keys = _KEYS_BY_SECTION.get(section, ["x"])
        body = draw(st.dictionaries(st.sampled_from(keys * 6 + ["bogus"]), _values, max_size=5))
        form = draw(st.sampled_from(["table", "table", "table", "inline", "scalar"]))
        if form == "inline":
            inline.append(f"{section} = {_render(body)}")
        elif form == "scalar":
            inline.append(f"{section} = {_render(draw(_scalars))}")
        else:
            tables += [f"[{section}]", *(f"{_toml_key(k)} = {_render(v)}" for k, v in body.items())]
    for name in draw(st.lists(st.sampled_from(sorted(_ARRAYS)), max_size=2)):
        for _ in range(draw(st.integers(1, 2))):
            item = draw(st.dictionaries(st.sampled_from(_ARRAYS[name] * 4 + ["x"]), _values, max_size=4))
            tables += [f"[[{name}]]", *(f"{_toml_key(k)} = {_render(v)}" for k, v in item.items())]
    return "\n".join(inline + tables) + "\n"


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=toml_documents())
def test_any_toml_document_gives_settings_or_one_usage_error(tmp_path, doc):
    path = tmp_path / "random.toml"
    path.write_text(doc, encoding="utf-8")
    try:
        result = load_settings(path, env={})
    except UsageError as exc:
        assert exc.message and exc.fix and "\n" not in exc.one_line()
    else:
        assert isinstance(result, Settings)


@hsettings(max_examples=300, deadline=None)
@given(env=st.dictionaries(st.sampled_from([f"GTP5G_OP_{n.upper()}" for n in KEYS]), st.text(max_size=30), max_size=6))
def test_any_environment_gives_settings_or_one_usage_error(env):
    try:
        assert isinstance(load_settings(env=env), Settings)
    except UsageError as exc:
        assert exc.message and exc.fix


@pytest.mark.parametrize("value", ["1e-300", "0.001", "0.5"])
def test_a_push_interval_below_a_second_is_refused_everywhere(tmp_path, value):
    """``--interval 1e-300`` (or the config's) passed: the pusher re-sent the whole set back to back, about
    10 GET+POST pairs a second against the test server here, the same spin issue 11 found with nan."""
    from click.testing import CliRunner

    from gtp5g_op.cli import main
    from gtp5g_op.trace.watch import BUNDLED_SAMPLE, WatchOptions, run_watch

    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[push]\ninterval = {value}\n")
    for source in ({"config": cfg}, {"env": {"GTP5G_OP_INTERVAL": value}}, {"interval": float(value)}):
        with pytest.raises(UsageError, match="too small"):
            load_settings(**({"env": {}} | source))
    out = CliRunner().invoke(main, ["watch", "--replay", "--push", "--interval", value])
    assert out.exit_code == 2 and "'--interval'" in out.output and "at least 1" in out.output, out.output
    with pytest.raises(UsageError, match="too small"):
        run_watch(WatchOptions(replay=BUNDLED_SAMPLE, interval=float(value)))
    assert load_settings(env={"GTP5G_OP_INTERVAL": "1"}).interval == 1.0


def test_a_path_under_an_unknown_users_home_is_one_usage_error(monkeypatch):
    """GTP5G_OP_PUBLIC_KEY='~0' (found by the hypothesis test above): pathlib raises RuntimeError."""
    from click.testing import CliRunner

    from gtp5g_op import config
    from gtp5g_op.cli import main
    from gtp5g_op.errors import UsageError

    with pytest.raises(UsageError, match="no such user's home directory"):
        config._path("~0", "public_key", True)
    res = CliRunner().invoke(main, ["verify", "x.ko", "--symvers", "~gtp5g-op-nosuchuser/x"])
    assert res.exit_code == 2 and "no such user's home directory" in res.output and "Traceback" not in res.output
