"""`gtp5g-op strategies` through click's CliRunner against a real test-server process."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gtp5g_op.cli import main
from gtp5g_op.errors import EXIT_API, EXIT_USAGE



@pytest.fixture
def run(gthulhu_server, tmp_path):
    """Invoke ``gtp5g-op strategies ...`` with the server's URL/key from the environment."""
    env = {
        "GTP5G_OP_API_URL": gthulhu_server.url,
        "GTP5G_OP_PUBLIC_KEY": str(gthulhu_server.public_key),
        "GTP5G_OP_STATE_DIR": str(tmp_path / "state"),
    }

    def invoke(*args: str, extra_env: dict | None = None):
        return CliRunner().invoke(main, ["strategies", *args], env={**env, **(extra_env or {})}, catch_exceptions=False)

    return invoke


def test_list_table_shows_local_comm_and_state(run, gthulhu_server):
    demo = gthulhu_server.state()["strategies"]
    gthulhu_server.control(strategies=[*demo, {"priority": True, "execution_time": 20000000, "pid": os.getpid()}])
    result = run("list")
    assert result.exit_code == 0, result.output
    assert str(os.getpid()) in result.output and "20 ms" in result.output
    assert "python" in result.output.lower() or "pytest" in result.output.lower()
    assert "not here" in result.output  # PID 4242 of the demo pod does not exist on this host


def test_list_json_is_the_servers_list(run):
    result = run("list", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == [
        {"priority": True, "execution_time": 20000000, "pid": 4242, "selectors": [{"key": "app", "value": "ueransim-macvlan"}]}
    ]


def test_push_delete_prune_only_touch_what_they_should(run, gthulhu_server):
    gthulhu_server.control(strategies=[
        {"priority": True, "execution_time": 20000000, "selectors": [{"key": "app", "value": "ueransim-macvlan"}], "command_regex": "nr-gnb|nr-ue|ping"},
        {"priority": False, "execution_time": 1, "pid": 999},
    ])
    result = run("push", "--pid", "101", "--pid", "102", "--no-priority", "--execution-time", "1.5ms", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["pushed"][0] == {"priority": False, "execution_time": 1500000, "pid": 101}
    assert doc["kept_foreign_pids"] == [999] and doc["kept_selector_strategies"] == 1
    raw = gthulhu_server.state()["strategies"]
    assert raw[0]["command_regex"] == "nr-gnb|nr-ue|ping" and gthulhu_server.pids() == {101, 102, 999}

    result = run("delete", "--pid", "102")
    assert result.exit_code == 0 and "102" in result.output
    assert gthulhu_server.pids() == {101, 999}

    result = run("prune", "--json")
    assert json.loads(result.output)["removed"] == [101]
    assert gthulhu_server.pids() == {999} and len(gthulhu_server.state()["strategies"]) == 2
    assert "nothing to remove" in run("prune").output


def test_push_takes_policy_from_config_file(run, gthulhu_server, tmp_path):
    cfg = tmp_path / "op.toml"
    cfg.write_text('[policy]\npriority = false\nexecution_time = "7ms"\n')
    result = run("--config", str(cfg), "push", "--pid", "5")
    assert result.exit_code == 0, result.output
    assert "priority false, 7 ms" in result.output
    assert {"priority": False, "execution_time": 7000000, "pid": 5} in gthulhu_server.state()["strategies"]


def test_delete_of_a_selector_pid_explains(run):
    result = run("delete", "--pid", "4242")
    assert result.exit_code == 1
    assert "4242 is matched by a selector strategy" in result.output


def test_wrong_key_missing_key_and_down_server_exit_codes(run, gthulhu_server, tmp_path):
    other = tmp_path / "other.pub"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    other.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    result = run("--public-key", str(other), "list")
    assert result.exit_code == EXIT_API
    assert result.output.startswith("gtp5g-op: error: POST ") and "HTTP 401" in result.output
    assert len(result.output.strip().splitlines()) == 1

    result = run("list", extra_env={"GTP5G_OP_PUBLIC_KEY": ""})
    assert result.exit_code == EXIT_USAGE and "no Gthulhu public key" in result.output

    gthulhu_server.stop()
    result = run("list")
    assert result.exit_code == EXIT_API and "cannot connect" in result.output


def test_help_has_examples():
    for args in (["strategies", "--help"], ["strategies", "list", "--help"], ["strategies", "push", "--help"],
                 ["strategies", "delete", "--help"], ["strategies", "prune", "--help"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and "Examples:" in result.output


def test_push_replace_drops_everything_else(run, gthulhu_server):
    gthulhu_server.control(strategies=[{"priority": False, "execution_time": 1, "pid": 999}])
    assert run("push", "--pid", "7").exit_code == 0
    result = run("push", "--pid", "8", "--replace")
    assert result.exit_code == 0, result.output
    assert gthulhu_server.state()["strategies"] == [{"priority": True, "execution_time": 20000000, "pid": 8}]
    assert json.loads(run("prune", "--json").output)["removed"] == [8]


# --- issue 12: the table at 80 columns, refusals, honest messages --------------------------------------


def test_list_at_80_columns_keeps_pid_comm_and_owner_whole(run, gthulhu_server):
    long_selectors = [{"key": "app.kubernetes.io/name", "value": "ueransim-gnb-with-a-long-name"},
                      {"key": "tier", "value": "radio-access-network"}]
    gthulhu_server.control(strategies=[
        {"priority": True, "execution_time": 20000000, "selectors": long_selectors, "command_regex": "nr-gnb|nr-ue|ping"},
        {"priority": True, "execution_time": 1500000, "pid": os.getpid()},
        {"priority": False, "execution_time": 1, "pid": 4194303},
    ], pods=[{"pod_name": "p", "labels": {s["key"]: s["value"] for s in long_selectors},
              "processes": [{"pid": 3999999, "command": "nr-gnb"}]}])
    for columns in ("80", "60", "120"):
        result = run("list", extra_env={"COLUMNS": columns})
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert all(len(line) <= int(columns) for line in lines), (columns, result.output)
        rows = [line for line in lines if line.startswith("│")]
        for pid, owner in ((str(os.getpid()), "foreign"), ("4194303", "foreign"), ("3999999", "selector")):
            row = next(r for r in rows if f" {pid} " in r)
            assert f" {owner} " in row, (columns, row)
        assert any(" python" in r or " pytest" in r for r in rows)
        assert "[/" not in result.output
    assert "not shown at 60 columns: command regex" in run("list", extra_env={"COLUMNS": "60"}).output
    wide = run("list", extra_env={"COLUMNS": "160"}).output
    assert "app.kubernetes.io/name=ueransim-gnb-with-a-long-name" in wide.replace("│\n│", "")


def test_server_strings_are_not_rich_markup(run, gthulhu_server):
    gthulhu_server.control(strategies=[{"priority": True, "execution_time": 1, "selectors": [{"key": "[/x]", "value": "[bold]v"}],
                                        "command_regex": "x|[/]"}],
                           pods=[{"pod_name": "p", "labels": {"[/x]": "[bold]v"}, "processes": [{"pid": 7, "command": "x"}]}])
    result = run("list", extra_env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "[/x]=[bold]v" in result.output


def test_pushing_a_pid_a_selector_strategy_covers_is_refused(run, gthulhu_server):
    before = gthulhu_server.state()["strategies"]
    result = run("push", "--pid", "4242")  # the demo pod's nr-gnb, covered by app=ueransim-macvlan
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "PID 4242 is already covered by the selector strategy app=ueransim-macvlan (priority true, 20 ms)" in result.output
    assert "fix: change that selector strategy instead" in result.output
    assert gthulhu_server.state()["strategies"] == before


def test_impossible_pids_and_a_zero_time_slice_are_usage_errors(run, gthulhu_server):
    for args, words in ((["push", "--pid", "99999999"], "above this kernel's pid_max"),
                        (["delete", "--pid", "99999999"], "above this kernel's pid_max"),
                        (["push", "--pid", "5", "--execution-time", "0"], "is not a time slice"),
                        (["push", "--pid", "5", "--execution-time", "0ms"], "is not a time slice"),
                        (["push", "--comm", "nr-gnb"], "takes PIDs, not comms")):
        result = run(*args)
        assert result.exit_code == EXIT_USAGE and words in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert gthulhu_server.state()["stats"].get("posts", 0) == 0


def test_prune_with_nothing_owned_still_asks_the_server_and_says_so(run, gthulhu_server):
    gthulhu_server.control(strategies=[{"priority": True, "execution_time": 1, "pid": 999}])
    result = run("prune")
    assert result.exit_code == 0
    assert "records no strategy of gtp5g-op" in result.output and "the server holds 1 PID strategy, none of them" in result.output
    assert gthulhu_server.state()["stats"]["GET /api/v1/scheduling/strategies"] == 1
    doc = json.loads(run("prune", "--json").output)
    assert doc["removed"] == [] and doc["server_pid_strategies"] == 1 and doc["recorded"] == []
    gthulhu_server.stop()
    result = run("prune")
    assert result.exit_code == EXIT_API and "cannot connect" in result.output


def test_push_message_grammar(run, gthulhu_server):
    gthulhu_server.control(strategies=[])
    assert "kept 0 selector strategies and 0 other PID strategies" in run("push", "--pid", "7").output
    assert "kept 0 selector strategies and 1 other PID strategy" in run("push", "--pid", "8").output
