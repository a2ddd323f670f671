"""Auto-detection of the API generation (legacy or v1.x Manager): right for both, and it never writes."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from gthulhu_fixtures import MANAGER_PASSWORD, MANAGER_USER, manager_args

from gtp5g_op.cli import main
from gtp5g_op.config import load_settings
from gtp5g_op.errors import EXIT_API, EXIT_USAGE, ApiError, UsageError
from gtp5g_op.gthulhu import factory
from gtp5g_op.gthulhu.detect import LEGACY, MANAGER, detect
from gtp5g_op.gthulhu.http import HttpClient

WRITES = ("POST /api/v1/scheduling/strategies", "PUT /api/v1/node-scheduling-policies",
          "DELETE /api/v1/node-scheduling-policies", "POST /api/v1/node-scheduling-policies")


def _wrote(server) -> dict:
    stats = server.state()["stats"]
    return {k: v for k, v in stats.items() if k in WRITES or k in ("tokens_issued", "logins")}


def test_legacy_and_manager_are_told_apart_without_a_write(gthulhu_server, manager_server):
    assert detect(HttpClient(gthulhu_server.url)).kind == LEGACY
    assert detect(HttpClient(manager_server.url)).kind == MANAGER
    assert _wrote(gthulhu_server) == {} and _wrote(manager_server) == {}  # no token, no login, no write


def test_a_decision_maker_is_refused_with_the_fix(gthulhu_start, manager_server):
    dm = gthulhu_start("--mode", "dm")
    for url in (dm.url, manager_server.dm_url):
        with pytest.raises(UsageError) as err:
            detect(HttpClient(url))
        assert "is a Gthulhu v1.x Decision Maker" in err.value.message and "--dm-url" in err.value.fix


def test_something_else_is_an_api_error_naming_what_answered(gthulhu_server):
    from gtp5g_op.ops.metrics import Metrics

    metrics = Metrics()
    server = metrics.serve(0, "127.0.0.1")
    try:
        with pytest.raises(ApiError) as err:
            detect(HttpClient(f"http://127.0.0.1:{server.port}"))
        assert "answers neither as a Gthulhu Manager nor as a legacy Gthulhu API" in err.value.message
        assert "HTTP 404" in err.value.message
    finally:
        metrics.stop()
    with pytest.raises(ApiError) as err:
        detect(HttpClient(gthulhu_server.url + "/api"))
    assert f"use {gthulhu_server.url} (without /api)" in err.value.fix


def test_the_cli_says_in_one_log_line_what_it_found(gthulhu_server, manager_server, tmp_path):
    env = {"GTP5G_OP_PUBLIC_KEY": str(gthulhu_server.public_key), "GTP5G_OP_STATE_DIR": str(tmp_path)}
    res = CliRunner().invoke(main, ["-v", "strategies", "--api-url", gthulhu_server.url, "list", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert f"INFO: {gthulhu_server.url} is a legacy Gthulhu API server (auto-detected: POST /api/v1/auth/token" in res.output
    env = {"GTP5G_OP_USERNAME": MANAGER_USER, "GTP5G_OP_PASSWORD": MANAGER_PASSWORD}
    res = CliRunner().invoke(main, ["-v", "strategies", "--api-url", manager_server.url, "list", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert f"INFO: {manager_server.url} is a Gthulhu v1.x Manager (auto-detected" in res.output


def test_a_wrong_explicit_kind_fails_before_any_write(gthulhu_server, manager_server, tmp_path):
    env = {"GTP5G_OP_PUBLIC_KEY": str(gthulhu_server.public_key), "GTP5G_OP_STATE_DIR": str(tmp_path),
           "GTP5G_OP_USERNAME": MANAGER_USER, "GTP5G_OP_PASSWORD": MANAGER_PASSWORD}
    res = CliRunner().invoke(main, ["strategies", "--api", "legacy", "--api-url", manager_server.url, "push", "--pid", "1"],
                             env=env)
    assert res.exit_code == EXIT_API and "--api manager" in res.output, res.output
    res = CliRunner().invoke(main, ["strategies", "--api", "manager", "--api-url", gthulhu_server.url, "push", "--comm", "x"],
                             env=env)
    assert res.exit_code == EXIT_API and "--api legacy" in res.output, res.output
    assert {k: v for k, v in _wrote(manager_server).items() if k != "tokens_issued"} == {}
    assert _wrote(gthulhu_server) == {}


def test_watch_preflight_detects_or_defers_and_refuses_missing_credentials(manager_server, tmp_path):
    settings = load_settings(env={"GTP5G_OP_USERNAME": MANAGER_USER, "GTP5G_OP_PASSWORD": MANAGER_PASSWORD},
                             api_url=manager_server.url)
    assert factory.preflight(settings) == MANAGER
    with pytest.raises(UsageError, match="no user name"):
        factory.preflight(load_settings(env={}, api_url=manager_server.url, public_key=manager_server.public_key))
    down = load_settings(env={"GTP5G_OP_USERNAME": "x", "GTP5G_OP_PASSWORD": "y"}, api_url="http://127.0.0.1:9")
    assert factory.preflight(down) == "auto"  # decided by the pusher once the API answers
    with pytest.raises(UsageError, match="neither a public key nor a user name"):
        factory.preflight(load_settings(env={}, api_url="http://127.0.0.1:9"))


def test_auto_backend_detects_at_the_first_push(gthulhu_start, tmp_path):
    from gtp5g_op.model import Target

    server = gthulhu_start(*manager_args())
    settings = load_settings(env={"GTP5G_OP_USERNAME": MANAGER_USER, "GTP5G_OP_PASSWORD": MANAGER_PASSWORD},
                             api_url=server.url, node_name="node-a")
    backend = factory.make_backend(settings, "auto")
    assert backend.kind == "auto"
    outcome = backend.push(frozenset({Target(1, 1, "nr-gnb")}))
    assert backend.kind == MANAGER and outcome.owned == 1 and len(server.policies(MANAGER_USER)) == 1
    backend.close()


def test_usage_errors_come_before_the_network(tmp_path):
    res = CliRunner().invoke(main, ["strategies", "--api-url", "http://127.0.0.1:9", "--password-file",
                                    str(tmp_path / "missing"), "--username", "u", "list"])
    assert res.exit_code == EXIT_USAGE and "password file" in res.output and "does not exist" in res.output
