"""Gthulhu v1.x Manager support against the test server's Manager mode (a real process on 127.0.0.1).

The test server stands in for Gthulhu v1.3.0's Manager and Decision Maker, which cannot run here
(they need Kubernetes and MongoDB); it follows the contract in docs/api.md, read from the v1.3.0 sources.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from conftest import host_pids, open_fifo_writer, wait_for
from gthulhu_fixtures import MANAGER_PASSWORD, MANAGER_USER, manager_args
from hypothesis import given, settings
from hypothesis import strategies as st

from gtp5g_op.cli import main
from gtp5g_op.config import Policy, Rule
from gtp5g_op.errors import EXIT_API, EXIT_FAIL, EXIT_USAGE, ApiError
from gtp5g_op.gthulhu import manager
from gtp5g_op.gthulhu.dm import DecisionMakerReader
from gtp5g_op.gthulhu.legacy import GthulhuClient
from gtp5g_op.gthulhu.manager import ManagerBackend, ManagerClient, NodePolicy, comm_regex, parse_regex, plan
from gtp5g_op.gthulhu.secret import Secret
from gtp5g_op.gthulhu.sync import StrategyPusher
from gtp5g_op.kernel import workload
from gtp5g_op.model import Target

NODE = "node-a"


def _client(server, user: str = MANAGER_USER, password: str = MANAGER_PASSWORD, **kw) -> ManagerClient:
    kw.setdefault("retries", 1)
    kw.setdefault("backoff_factor", 0.05)
    kw.setdefault("timeout", (1, 2))
    return ManagerClient(server.url, user, Secret(password), **kw)


def _t(pid: int, comm: str = "nr-gnb", tgid: int | None = None) -> Target:
    return Target(pid, tgid or pid, comm)


def _pusher(server, node: str = NODE, interval: float = 10.0, dm: DecisionMakerReader | None = None, **kw) -> StrategyPusher:
    return StrategyPusher(ManagerBackend(_client(server, **kw), node, Policy(), dm), interval=interval, debounce=0.05)


def _mine(server, node: str = NODE) -> list[dict]:
    return [p for p in server.policies(MANAGER_USER) if p["nodeNames"] == [node]]


# --- the regex ------------------------------------------------------------------------------------


def test_comm_regex_matches_exactly_the_comms():
    regex = comm_regex(["nr-ue", "nr-gnb", "a.b", "x y", "(|)"])
    assert regex == r"^(?P<gtp5g_op>)(?:\(\|\)|a\.b|nr-gnb|nr-ue|x\x20y)$"
    for comm in ("nr-gnb", "nr-ue", "a.b", "x y", "(|)"):
        assert re.search(regex, comm)
    for comm in ("nr-gnb2", "xnr-ue", "axb", "", "x  y", "nr"):
        assert not re.search(regex, comm)
    assert parse_regex(regex) == ("watch", ("(|)", "a.b", "nr-gnb", "nr-ue", "x y"))
    assert parse_regex(comm_regex(["nr-gnb"], "manual")) == ("manual", ("nr-gnb",))
    for foreign in ("nr-gnb|nr-ue", "^(?:nr-gnb)$", "^(?P<gtp5g_op>)(?:a|.*)$", "^(?P<gtp5g_op>)(?:a\\d)$", ""):
        assert parse_regex(foreign) is None


COMM = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=15).filter(manager.usable_comm)


@given(st.lists(COMM, min_size=1, max_size=4), COMM)
@settings(max_examples=300, deadline=None)
def test_comm_regex_round_trips_and_matches_nothing_else(comms, other):
    regex = comm_regex(comms)
    assert parse_regex(regex) == ("watch", tuple(sorted(set(comms))))
    assert all(re.search(regex, c) for c in comms)
    assert bool(re.search(regex, other)) == (other in comms)


def test_comm_regex_means_the_same_in_go_re2(tmp_path):
    """The Decision Maker compiles the regex with Go's regexp (RE2): check with the real thing."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain here (apt-get install golang-go) to check RE2 semantics")
    cases = [(["nr-gnb", "nr-ue"], ["nr-gnb", "nr-ue", "nr-gnb2", "xnr-ue", ""]),
             (["a.b", "x y", "(|)", "t\tab", "ü-ñ", "$^\\"], ["a.b", "axb", "x y", "(|)", "t\tab", "ü-ñ", "$^\\", "xy"])]
    doc = [{"regex": comm_regex(comms), "subjects": subjects} for comms, subjects in cases]
    (tmp_path / "cases.json").write_text(json.dumps(doc))
    (tmp_path / "main.go").write_text(
        'package main\nimport ("encoding/json"; "fmt"; "os"; "regexp")\n'
        'type C struct { Regex string; Subjects []string }\n'
        'func main() { var cs []C; b, _ := os.ReadFile(os.Args[1]); json.Unmarshal(b, &cs)\n'
        ' out := [][]bool{}; for _, c := range cs { re := regexp.MustCompile(c.Regex); r := []bool{}\n'
        ' for _, s := range c.Subjects { r = append(r, re.MatchString(s)) }; out = append(out, r) }\n'
        ' j, _ := json.Marshal(out); fmt.Println(string(j)) }\n')
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "GOFLAGS": "-mod=mod",
           "GO111MODULE": "off"}
    out = subprocess.run([go, "run", str(tmp_path / "main.go"), str(tmp_path / "cases.json")], capture_output=True,
                         text=True, timeout=300, env=env, check=False)
    assert out.returncode == 0, out.stderr
    go_says = json.loads(out.stdout)
    python_says = [[bool(re.search(d["regex"], s)) for s in d["subjects"]] for d in doc]
    assert go_says == python_says
    assert go_says[0] == [True, True, False, False, False]


def test_plan_keeps_updates_creates_and_deletes_with_fewest_calls():
    p = lambda i, comms, prio=10, exe=20_000_000: NodePolicy(f"{i:024x}", (NODE,), comm_regex(comms), prio, exe)  # noqa: E731
    groups = {(10, 20_000_000): ("nr-gnb", "nr-ue")}
    assert plan([p(1, ["nr-gnb", "nr-ue"])], groups).changes == 0
    todo = plan([p(1, ["nr-gnb"]), p(2, ["nr-gnb"])], groups)  # a comm came, and a duplicate from a retried create
    assert [u[0].id for u in todo.update] == [f"{1:024x}"] and [d.id for d in todo.delete] == [f"{2:024x}"]
    assert not todo.create
    assert plan([], groups).create == [((10, 20_000_000), ("nr-gnb", "nr-ue"))]
    assert [d.id for d in plan([p(1, ["nr-gnb"])], {}).delete] == [f"{1:024x}"]


def test_overrides_split_comms_into_policies():
    policy = Policy(overrides=(Rule(comm="^nr-gnb$", execution_time_ns=40_000_000),), manager_priority=7)
    groups = manager.desired_groups([_t(1), _t(2, "nr-ue"), _t(3, "nr-ue")], policy)
    assert groups == {(7, 20_000_000): ("nr-ue",), (7, 40_000_000): ("nr-gnb",)}
    assert manager.desired_groups([_t(1)], Policy(priority=False)) == {(0, 20_000_000): ("nr-gnb",)}


# --- the client -----------------------------------------------------------------------------------


def test_login_list_create_update_delete_and_no_id_in_the_post_answer(manager_server):
    with _client(manager_server) as c:
        assert c.list_policies() == []
        c.create_policy(NODE, comm_regex(["nr-gnb"]), 10, 20_000_000)
        (policy,) = c.list_policies()
        assert policy.owner == "watch" and policy.comms == ("nr-gnb",) and policy.node_names == (NODE,)
        c.update_policy(policy.id, NODE, comm_regex(["nr-gnb", "nr-ue"]), 10, 20_000_000)
        assert [p.id for p in c.list_policies()] == [policy.id] and c.list_policies()[0].comms == ("nr-gnb", "nr-ue")
        c.delete_policy(policy.id)
        assert c.list_policies() == []
    stats = manager_server.state()["stats"]
    assert stats["logins"] == 1 and stats["logouts"] == 1  # logged out (refresh token revoked) at close


def test_wrong_password_is_one_line_with_url_and_server_message(manager_server):
    with pytest.raises(ApiError) as err:
        _client(manager_server, password="nope").list_policies()
    assert err.value.message == f"POST {manager_server.url}/api/v1/auth/login: HTTP 401: invalid password"
    assert "--username" in err.value.fix and "GTP5G_OP_PASSWORD" in err.value.fix
    res = CliRunner().invoke(main, ["strategies", "--api-url", manager_server.url, "--username", MANAGER_USER, "list"],
                             env={"GTP5G_OP_PASSWORD": "nope"})
    assert res.exit_code == EXIT_API and len(res.output.strip().splitlines()) == 1
    assert "invalid password" in res.output and "nope" not in res.output


def test_rbac_403_and_unknown_node_name_the_fix(manager_server):
    with pytest.raises(ApiError) as err:
        _client(manager_server, "viewer", "viewer-pw").create_policy(NODE, comm_regex(["x"]), 10, 1)
    assert "HTTP 403: permission denied" in err.value.message and "node_scheduling_policy.create" in err.value.fix
    with pytest.raises(ApiError) as err:
        _client(manager_server).create_policy("no-such-node", comm_regex(["x"]), 10, 1)
    assert "HTTP 404: no nodes match the policy criteria" in err.value.message and "spec.nodeName" in err.value.fix


def test_the_test_server_types_the_body_like_go(manager_server):
    import requests

    c = _client(manager_server)
    c.list_policies()
    token = c._token().reveal()
    for bad in ({"priority": True}, {"priority": 1.5}, {"executionTime": "20ms"}, {"nodeNames": "node-a"}):
        resp = requests.post(manager_server.url + "/api/v1/node-scheduling-policies", timeout=5,
                             json={"nodeNames": [NODE], "commandRegex": "x", **bad}, headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 400 and resp.json() == {"success": False, "error": "Invalid request body"}
    resp = requests.get(manager_server.url + "/api/v1/no-such", timeout=5)
    assert resp.status_code == 404 and resp.json() == {"message": "Not Found"}
    resp = requests.get(manager_server.url + "/api/v1/node-scheduling-policies/self", timeout=5)
    assert resp.status_code == 401 and resp.json()["error"] == "Missing Authorization header"


def test_token_lapse_is_renewed_by_refresh_and_a_revoked_session_logs_in_again(gthulhu_start):
    server = gthulhu_start(*manager_args("--token-lifetime", "2"))
    c = _client(server)
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:
        c.list_policies()
        time.sleep(0.25)
    stats = server.state()["stats"]
    assert stats["logins"] == 1 and stats["refreshes"] >= 2 and "token_expired" not in stats
    server.control(revoke_tokens=True)  # every token void: 401, refresh refused, a new login
    assert c.list_policies() == []
    assert server.state()["stats"]["logins"] == 2


# --- the pusher -----------------------------------------------------------------------------------


def test_one_policy_created_updated_in_place_then_deleted_and_others_untouched(manager_server):
    alice = {"creator": "alice", "nodeNames": [NODE], "commandRegex": "^(?P<gtp5g_op>)(?:nr-gnb)$", "priority": 5,
             "executionTime": 1}  # another user who also runs gtp5g-op: never seen, never touched
    by_hand = {"creator": MANAGER_USER, "nodeNames": [NODE], "commandRegex": "^iperf3$", "priority": 3}
    other_node = {"creator": MANAGER_USER, "nodeNames": ["node-b"], "commandRegex": "^(?P<gtp5g_op>)(?:nr-ue)$",
                  "priority": 10, "executionTime": 20000000}
    manager_server.control(policies=[alice, by_hand, other_node])
    untouched = [p for p in manager_server.policies() if p["creator"] == "alice" or p["nodeNames"] != [NODE]
                 or p["commandRegex"] == "^iperf3$"]
    pusher = _pusher(manager_server)
    pusher.start()
    started = time.monotonic()
    pusher.update([_t(101), _t(102, tgid=101)])
    assert wait_for(lambda: len(_mine(manager_server)) == 2, 2.0)  # the hand-made one and ours
    assert time.monotonic() - started < 1.0
    (ours,) = [p for p in _mine(manager_server) if "gtp5g_op" in p["commandRegex"]]
    assert ours["commandRegex"] == "^(?P<gtp5g_op>)(?:nr-gnb)$" and ours["priority"] == 10
    assert ours["executionTime"] == 20_000_000

    pusher.update([_t(101), _t(103, "nr-ue")])  # the comm set changes: the same policy is updated
    assert wait_for(lambda: any(p["commandRegex"].endswith("(?:nr-gnb|nr-ue)$") for p in _mine(manager_server)), 2.0)
    (updated,) = [p for p in _mine(manager_server) if "gtp5g_op" in p["commandRegex"]]
    assert updated["id"] == ours["id"]

    pusher.update([])  # no target left: the policy goes
    assert wait_for(lambda: not any("gtp5g_op" in p["commandRegex"] for p in _mine(manager_server)), 2.0)
    assert pusher.stop(final_push=True)
    st = pusher.status
    assert st.api == "manager" and st.pushes_failed == 0 and st.owned == 0
    assert all(p in manager_server.policies() for p in untouched)
    stats = manager_server.state()["stats"]
    assert stats["policies_created"] == 1 and stats["policies_updated"] == 1 and stats["policies_deleted"] == 1


def test_manager_restart_mid_watch_is_restored_within_one_interval(manager_server):
    pusher = _pusher(manager_server, interval=1.0)
    pusher.start()
    pusher.update([_t(101)])
    assert wait_for(lambda: _mine(manager_server), 2.0)
    manager_server.restart()  # an in-memory Manager comes back empty (a real one keeps MongoDB)
    assert manager_server.policies() == []
    restored = wait_for(lambda: _mine(manager_server), 3.0)
    assert restored is not None and restored < 2.0, restored
    assert pusher.stop(final_push=False)


def test_outage_is_logged_once_and_a_dropped_create_makes_no_duplicate(manager_server, caplog):
    caplog.set_level(logging.DEBUG)
    pusher = _pusher(manager_server, interval=0.5)
    pusher.start()
    pusher.update([_t(101)])
    assert wait_for(lambda: _mine(manager_server), 2.0)
    manager_server.control(fault="500")
    pusher.update([_t(101), _t(102, "nr-ue")])
    assert wait_for(lambda: pusher.status.pushes_failed >= 3, 8.0)
    manager_server.control(fault=None)
    assert wait_for(lambda: [p["commandRegex"] for p in _mine(manager_server)] == ["^(?P<gtp5g_op>)(?:nr-gnb|nr-ue)$"], 3.0)
    # a duplicate (as a create that reached the server twice would leave) is cleaned up by the next push
    manager_server.control(policies=[*_mine(manager_server), {**_mine(manager_server)[0], "id": None}])
    assert wait_for(lambda: len(_mine(manager_server)) == 1, 3.0)
    assert pusher.stop(final_push=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("cannot push strategies" in m for m in warnings) == 1 and sum("is back after" in m for m in warnings) == 1
    assert all(MANAGER_PASSWORD not in r.getMessage() for r in caplog.records)


def test_decision_maker_shows_what_is_boosted_and_flags_the_unvalidated(manager_server, tmp_path):
    """Two real processes named nr-gnb; the watch validated only one. The DM boosts both (by comm)."""
    node = manager_server.state()["dm_node"]
    with workload.start("nr-gnb", threads=1, rate=1) as valid, workload.start("nr-gnb", threads=0, rate=1) as impostor:
        from gtp5g_op.ops.metrics import Metrics

        dm = DecisionMakerReader(GthulhuClient(manager_server.dm_url, manager_server.public_key.read_bytes(), retries=0))
        pusher = _pusher(manager_server, node=node, dm=dm)
        pusher.metrics = metrics = Metrics()
        pusher.start()
        pusher.update([_t(valid.pid), *(_t(tid, "nr-gnb", valid.pid) for tid in valid.ready.tids)])
        assert wait_for(lambda: pusher.status.boosted, 3.0)
        st = pusher.status
        assert valid.pid in st.boosted and impostor.pid in st.boosted
        assert impostor.pid in st.boosted_unvalidated and valid.pid not in st.boosted_unvalidated
        value = metrics.registry.get_sample_value
        assert value("gtp5g_op_dm_boosted_pids", {"validated": "false"}) >= 1
        assert value("gtp5g_op_dm_boosted_pids", {"validated": "true"}) >= 1
        assert pusher.stop(final_push=True)


# --- the CLI --------------------------------------------------------------------------------------


@pytest.fixture
def run(manager_server, tmp_path):
    env = {"GTP5G_OP_API_URL": manager_server.url, "GTP5G_OP_USERNAME": MANAGER_USER,
           "GTP5G_OP_PASSWORD": MANAGER_PASSWORD, "GTP5G_OP_STATE_DIR": str(tmp_path / "state"), "NODE_NAME": NODE}

    def invoke(*args: str, extra_env: dict | None = None):
        return CliRunner().invoke(main, ["strategies", *args], env={**env, **(extra_env or {})}, catch_exceptions=False)

    return invoke


def test_cli_push_list_delete_prune_by_comm(run, manager_server, tmp_path):
    manager_server.control(policies=[{"creator": MANAGER_USER, "nodeNames": [NODE], "commandRegex": "^iperf3$", "priority": 3}])
    res = run("push", "--comm", "nr-gnb", "--comm", "nr-ue", "--execution-time", "5ms", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["created"] == ["nr-gnb", "nr-ue"] and doc["priority"] == 10 and doc["execution_time"] == 5_000_000
    assert sorted(p["commandRegex"] for p in _mine(manager_server)) == [
        "^(?P<gtp5g_op_manual>)(?:nr-gnb)$", "^(?P<gtp5g_op_manual>)(?:nr-ue)$", "^iperf3$"]
    res = run("push", "--comm", "nr-gnb")  # again, other parameters: updated in place
    assert res.exit_code == 0 and "updated the policy for nr-gnb on node node-a (priority 10, 20 ms)" in res.output

    listed = json.loads(run("list", "--json").output)
    assert listed["api"] == "manager" and {p["owner"] for p in listed["policies"]} == {"manual", None}
    res = run("list", extra_env={"COLUMNS": "80"})
    assert res.exit_code == 0 and "nr-gnb" in res.output and "iperf3" in res.output
    assert all(len(line) <= 80 for line in res.output.splitlines())

    res = run("push", "--comm", "iperf3")  # matched by the user's own hand-made policy: refused
    assert res.exit_code == EXIT_FAIL and "already matched by the policy" in res.output and "^iperf3$" in res.output
    res = run("push", "--pid", "4242")
    assert res.exit_code == EXIT_USAGE and "takes no PIDs" in res.output

    res = run("delete", "--comm", "nr-ue")
    assert res.exit_code == 0 and "removed nr-ue" in res.output
    res = run("delete", "--comm", "iperf3")
    assert res.exit_code == EXIT_FAIL and "change that policy instead" in res.output
    res = run("prune", "--json")
    assert [p["comms"] for p in json.loads(res.output)["removed"]] == [["nr-gnb"]]
    assert [p["commandRegex"] for p in _mine(manager_server)] == ["^iperf3$"]
    assert "nothing to remove" in run("prune").output


def test_cli_list_with_the_decision_maker(run, manager_server):
    node = manager_server.state()["dm_node"]
    with workload.start("nr-gnb", threads=0, rate=1) as wl:
        assert run("push", "--comm", "nr-gnb", "--node-name", node).exit_code == 0
        res = run("list", "--json", "--node-name", node, "--dm-url", manager_server.dm_url,
                  "--public-key", str(manager_server.public_key))
        assert res.exit_code == 0, res.output
        boosted = json.loads(res.output)["decision_maker"]["boosted"]
        row = next(b for b in boosted if b["pid"] == wl.pid)
        assert row["comm"] == "nr-gnb" and row["policy"] == "manual" and row["valid"] is True
        res = run("list", "--node-name", node, "--dm-url", manager_server.dm_url, "--public-key", str(manager_server.public_key))
        assert f"{wl.pid}" in res.output and "Decision Maker" in res.output
    run("prune", "--node-name", node)


def test_cli_missing_credentials_are_usage_errors(run, tmp_path):
    res = run("list", extra_env={"GTP5G_OP_USERNAME": ""})
    assert res.exit_code == EXIT_USAGE and "no user name" in res.output
    res = run("list", extra_env={"GTP5G_OP_PASSWORD": ""})
    assert res.exit_code == EXIT_USAGE and "no password" in res.output
    (tmp_path / "pw").write_text(MANAGER_PASSWORD + "\n")
    res = run("list", "--password-file", str(tmp_path / "pw"), extra_env={"GTP5G_OP_PASSWORD": "stale"})
    assert res.exit_code == 0, res.output  # an explicit --password-file beats the environment


@host_pids
def test_watch_push_against_a_manager_end_to_end(gthulhu_start, tmp_path):
    """The whole ``watch --push`` process with auto-detection, a 2 s access token and a restart."""
    server = gthulhu_start(*manager_args("--token-lifetime", "2"))
    node = server.state()["dm_node"]
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    (tmp_path / "pw").write_text(MANAGER_PASSWORD)
    cmd = [sys.executable, "-m", "gtp5g_op", "-v", "watch", "--trace-pipe", str(fifo), "--push", "--interval", "1",
           "--json", "--api-url", server.url, "--username", MANAGER_USER, "--password-file", str(tmp_path / "pw"),
           "--dm-url", server.dm_url, "--public-key", str(server.public_key)]
    watch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "GTP5G_OP_STATE_DIR": str(tmp_path / "state"), "NODE_NAME": node})
    try:
        with workload.start("nr-ue", threads=2, rate=1) as wl:
            with open_fifo_writer(fifo, watch) as pipe:
                pipe.write(f"nr-ue-{wl.pid} [001] ..s21 5.000000: bpf_trace_printk: stop: pid={wl.pid} (nr-ue)\n".encode())
                assert wait_for(lambda: [p["commandRegex"] for p in server.policies(MANAGER_USER)]
                                == ["^(?P<gtp5g_op>)(?:nr-ue)$"], 5)
                dm = DecisionMakerReader(GthulhuClient(server.dm_url, server.public_key.read_bytes()))
                assert wl.pid in dm.boosted(["^(?P<gtp5g_op>)(?:nr-ue)$"])  # what the node's scheduler applies
                time.sleep(4.5)  # two access-token lifetimes
                server.restart()
                restored = wait_for(lambda: server.policies(MANAGER_USER), 5)
                assert restored is not None and restored < 2.5, restored
            out, err = watch.communicate(timeout=20)  # end of input while the target runs: the final push keeps it
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.communicate()
    assert watch.returncode == 0, err.decode()[-2000:]
    report = json.loads(out)
    push = report["push"]
    assert push["api"] == "manager" and push["pushes_failed"] == 0 and push["token_renewals"] >= 3
    assert wl.pid in push["boosted"] and push["boosted_unvalidated"] == []
    assert [p["commandRegex"] for p in server.policies(MANAGER_USER)] == ["^(?P<gtp5g_op>)(?:nr-ue)$"]
    assert b"is a Gthulhu v1.x Manager (auto-detected" in err
    assert MANAGER_PASSWORD.encode() not in out + err and b"eyJ" not in out + err


def test_comms_from_the_server_or_the_command_line_reach_the_terminal_escaped(run, manager_server):
    """A policy named by a server (or a comm typed on the command line) holding ESC sequences and a newline:
    push, delete and prune printed them raw, so a hostile server could drive the terminal."""
    hostile = "^(?P<gtp5g_op_manual>)(?:a\\x1B\\[2Jb)$"  # our own marker: prune deletes it and names its comm
    manager_server.control(policies=[{"creator": MANAGER_USER, "nodeNames": [NODE], "commandRegex": hostile,
                                      "priority": 3}])
    res = run("prune")
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "a\\x1b[2Jb" in res.output, res.output
    res = run("push", "--comm", "c\x1b]0;title\x07d")
    assert res.exit_code == 0 and "\x1b" not in res.output and "\x07" not in res.output, res.output
    assert "c\\x1b]0;title\\x07d" in res.output
    res = run("delete", "--comm", "c\x1b]0;title\x07d")
    assert res.exit_code == 0 and "\x1b" not in res.output and "c\\x1b]0;title\\x07d" in res.output, res.output
