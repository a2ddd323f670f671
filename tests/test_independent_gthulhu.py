"""gtp5g-op against independent Gthulhu servers (``independent_gthulhu.py``), as a user would run it.

Those servers were written from the real v1.3.0 Manager / Decision Maker and v0.1.0 legacy sources by
a reviewer, separately from the project's own test server, so that a misreading of the contract shared
by the client and ``gthulhu.testserver`` fails here. They run in a thread of this process on
127.0.0.1 (real HTTP, real sockets); the live test at the end drives a real ``nr-gnb`` process through
the selftest BPF probe.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from conftest import host_pids, wait_for
from cryptography.hazmat.primitives.asymmetric import rsa
from gthulhu_fixtures import manager_args, start_server
from independent_gthulhu import Server, State, free_port

from gtp5g_op.cli import main
from gtp5g_op.config import load_settings
from gtp5g_op.errors import EXIT_API, EXIT_FAIL, UsageError
from gtp5g_op.gthulhu import factory
from gtp5g_op.gthulhu.detect import LEGACY, MANAGER, detect
from gtp5g_op.gthulhu.http import HttpClient
from gtp5g_op.kernel import workload
from gtp5g_op.model import Target
from gtp5g_op.ops import doctor

NODE, USER, PASSWORD = "node-a", "gtp5g-op", "Upf-0perator!"
OURS = re.compile(r"\^\(\?P<gtp5g_op>\)\(\?:(.*)\)\$")


@pytest.fixture
def cluster() -> Iterator[dict]:
    """A Manager (chunked answers, keep-alive dropped every 3rd answer) and its node's Decision Maker.

    Users: gtp5g-op (admin), alice (admin, with a policy on our node), newbie (must change the
    password first), viewer (may only read). gtp5g-op already has hand-made policies: one on this
    node, one on node-b, one by node selector.
    """
    state = State(nodes=(NODE, "node-b", "node-c"))
    state.add_user(USER, PASSWORD)
    state.add_user("alice", "alice-pw")
    state.add_user("newbie", "newbie-pw", status=3)
    state.add_user("viewer", "viewer-pw", roles=("policy-reader",))
    others = [
        state.add_policy("alice", nodeNames=[NODE], commandRegex="^nr-gnb$", priority=7, executionTime=5_000_000),
        state.add_policy(USER, nodeNames=[NODE], commandRegex="^iperf3$", priority=3, executionTime=1_000_000),
        state.add_policy(USER, nodeNames=["node-b"], commandRegex="^(?P<gtp5g_op>)(?:nr-ue)$", priority=10,
                         executionTime=20_000_000),  # node-b's watch: never ours to touch
        state.add_policy(USER, nodeSelectors=[{"key": "gthulhu.io/role", "value": "upf"}], commandRegex="^chronyd$",
                         priority=2, executionTime=2_000_000),
    ]
    manager = Server("manager", state, chunked=True, close_every=3).serve()
    dm = Server("dm", state).serve()
    state.dm_node = NODE
    state.dm_extra = [{"priority": 1, "execution_time": 5_000_000, "pid": 1, "selectors": [{"key": "app", "value": "web"}],
                       "command_regex": "^nginx$"}]  # a pod intent of someone else's strategy
    try:
        yield {"state": state, "manager": manager, "dm": dm, "others": others,
               "snapshot": {pid: dict(state.policies[pid]) for pid in others}}
    finally:
        manager.stop()
        dm.stop()


@pytest.fixture
def legacy() -> Iterator[Server]:
    server = Server("legacy", chunked=False, close_every=2).serve()
    try:
        yield server
    finally:
        server.stop()


def watch_policies(state: State, node: str = NODE) -> list[dict]:
    """gtp5g-op's watch policies on ``node`` (as stored by the Manager)."""
    return [p for p in state.policies_of(USER) if p["nodeNames"] == [node] and OURS.fullmatch(p["commandRegex"])]


def others_untouched(cluster: dict) -> bool:
    state = cluster["state"]
    return all(state.policies.get(pid) == snap for pid, snap in cluster["snapshot"].items())


def settings(cluster: dict, tmp_path: Path, **flags):
    pub = tmp_path / "dm.pub"
    pub.write_bytes(cluster["state"].public_pem())
    flags = {"api_url": cluster["manager"].url, "username": USER, "node_name": NODE, "interval": 1.0,
             "state_dir": str(tmp_path / "state"), **flags}
    if flags.get("dm_url"):
        flags.setdefault("public_key", str(pub))
    return load_settings(env={"GTP5G_OP_PASSWORD": PASSWORD}, **flags)


def cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env or {}, catch_exceptions=False)


def one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gtp5g-op: error: ") and "; fix: " in lines[0], output
    assert "Traceback" not in output
    return lines[0]


# --- which server is it ------------------------------------------------------------------------------


def test_auto_detection_names_each_generation_and_writes_nothing(cluster, legacy):
    assert detect(HttpClient(cluster["manager"].url)).kind == MANAGER
    assert detect(HttpClient(legacy.url)).kind == LEGACY
    with pytest.raises(UsageError) as err:
        detect(HttpClient(cluster["dm"].url))
    assert "Decision Maker" in err.value.message and "--dm-url" in err.value.fix
    for state in (cluster["state"], legacy.state):
        assert state.writes() == []
        assert all(r.body == {} for r in state.requests if r.path.endswith("/login"))  # probes, no real login


def test_a_decision_maker_older_than_1_3_is_not_taken_for_a_legacy_server():
    """v1.0 .. v1.2 Decision Makers have no node-intents route, but answer the token probe like legacy."""
    state = State()
    with Server("dm", state, before_v1_3=True) as old_dm:
        with pytest.raises(UsageError) as err:
            detect(HttpClient(old_dm.url))
    assert "Decision Maker" in err.value.message
    assert state.writes() == []
    # a legacy server whose 404s happen to look like echo's is still legacy: it has no DM /version
    with Server("legacy", State(), echo_404=True) as odd_legacy:
        assert detect(HttpClient(odd_legacy.url)).kind == LEGACY


def test_a_wrong_explicit_api_fails_on_its_first_call_and_writes_nothing(cluster, legacy, tmp_path):
    pub = tmp_path / "k.pub"
    pub.write_bytes(legacy.state.public_pem())
    env = {"GTP5G_OP_STATE_DIR": str(tmp_path / "state"), "GTP5G_OP_PASSWORD": PASSWORD, "NODE_NAME": NODE}
    res = cli("strategies", "--api", "legacy", "--api-url", cluster["manager"].url, "--public-key", str(pub),
              "push", "--pid", str(os.getpid()), env=env)
    assert res.exit_code == EXIT_API and "--api manager" in one_line_error(res.output)
    res = cli("strategies", "--api", "manager", "--api-url", legacy.url, "--username", USER, "push", "--comm", "nr-gnb",
              env=env)
    assert res.exit_code == EXIT_API and "--api legacy" in one_line_error(res.output)
    assert cluster["state"].writes() == [] and legacy.state.writes() == []


# --- the Manager: what a watch pushes ----------------------------------------------------------------


def test_one_policy_per_node_created_updated_in_place_deleted_and_nothing_else_touched(cluster, tmp_path):
    state = cluster["state"]
    pusher = factory.make_pusher(settings(cluster, tmp_path, api_kind="auto"))
    pusher.start()
    try:
        pusher.update([Target(101, 101, "nr-gnb"), Target(102, 101, "nr-gnb")])
        assert wait_for(lambda: watch_policies(state), 3.0) is not None
        [created] = watch_policies(state)
        assert created["commandRegex"] == "^(?P<gtp5g_op>)(?:nr-gnb)$"
        assert created["priority"] > 0 and created["executionTime"] == 20_000_000
        first_id = next(pid for pid, p in state.policies.items() if p == created)

        pusher.update([Target(101, 101, "nr-gnb"), Target(201, 201, "nr-ue")])
        assert wait_for(lambda: [p["commandRegex"] for p in watch_policies(state)]
                        == ["^(?P<gtp5g_op>)(?:nr-gnb|nr-ue)$"], 3.0) is not None
        assert state.policies[first_id]["commandRegex"] == "^(?P<gtp5g_op>)(?:nr-gnb|nr-ue)$"  # the same id: a PUT
        assert [r.method for r in state.writes()] == ["POST", "PUT"]

        pusher.update([])
        assert wait_for(lambda: not watch_policies(state), 3.0) is not None
        assert first_id not in state.policies
        assert others_untouched(cluster)
    finally:
        pusher.stop(final_push=False)
    assert pusher.status.api == "manager" and pusher.status.pushes_failed == 0
    assert [r.method for r in state.writes()] == ["POST", "PUT", "DELETE"]


def test_rotating_refresh_tokens_a_revoked_session_and_a_lapsing_token_never_fail_a_push(cluster, tmp_path):
    state = cluster["state"]
    state.access_ttl = 2  # the access token lapses every 2 s; every refresh revokes the refresh token it used
    pusher = factory.make_pusher(settings(cluster, tmp_path, api_kind="manager"))
    pusher.start()
    try:
        pusher.update([Target(101, 101, "nr-gnb")])
        assert wait_for(lambda: watch_policies(state), 3.0) is not None
        time.sleep(4.5)
        state.user(USER).token_version += 1  # "log out everywhere": access and refresh tokens are void
        pusher.update([Target(101, 101, "nr-gnb"), Target(201, 201, "nr-ue")])
        assert wait_for(lambda: "nr-ue" in watch_policies(state)[0]["commandRegex"], 3.0) is not None
        time.sleep(2.5)
    finally:
        pusher.stop(final_push=False)
    st = pusher.status
    assert st.pushes_failed == 0 and st.pushes_ok >= 6, st
    refreshes = [r for r in state.requests if r.path == "/api/v1/auth/refresh"]
    logins = [r for r in state.requests if r.path == "/api/v1/auth/login" and r.body.get("password")]
    assert len(refreshes) >= 2 and len(logins) == 2  # refreshed in time; logged in again only after the revocation
    assert len({r.body["refreshToken"] for r in refreshes}) == len(refreshes)  # a rotated token is never reused


def test_a_rotated_password_in_the_password_file_is_picked_up_without_a_restart(cluster, tmp_path):
    """An admin changes the user's password (every session revoked) and updates the mounted Secret."""
    state = cluster["state"]
    pw = tmp_path / "password"
    pw.write_text(PASSWORD + "\n")
    s = load_settings(env={}, api_url=cluster["manager"].url, api_kind="manager", username=USER, node_name=NODE,
                      password_file=str(pw), interval=1.0, state_dir=str(tmp_path / "state"))
    pusher = factory.make_pusher(s)
    pusher.start()
    try:
        pusher.update([Target(101, 101, "nr-gnb")])
        assert wait_for(lambda: watch_policies(state), 3.0) is not None
        state.user(USER).password = "Rotated-Pa55"
        state.user(USER).token_version += 1
        pw.write_text("Rotated-Pa55\n")
        pusher.update([Target(101, 101, "nr-gnb"), Target(201, 201, "nr-ue")])
        assert wait_for(lambda: "nr-ue" in watch_policies(state)[0]["commandRegex"], 3.0) is not None
    finally:
        pusher.stop(final_push=False)
    assert pusher.status.pushes_failed == 0


def test_tokens_without_iat_and_a_refresh_that_does_not_rotate(tmp_path):
    """Variations the contract allows: access tokens with ``exp`` only, a refresh answering only a new
    access token. The client renews in time (no call answered 401) and keeps its refresh token."""
    state = State(nodes=(NODE,))
    state.add_user(USER, PASSWORD)
    state.access_ttl = 3
    with Server("manager", state, no_iat=True, no_rotation=True) as manager:
        s = load_settings(env={"GTP5G_OP_PASSWORD": PASSWORD}, api_url=manager.url, api_kind="manager", username=USER,
                          node_name=NODE, interval=1.0, state_dir=str(tmp_path / "state"))
        pusher = factory.make_pusher(s)
        pusher.start()
        try:
            pusher.update([Target(101, 101, "nr-gnb")])
            assert wait_for(lambda: watch_policies(state), 3.0) is not None
            time.sleep(6.5)
        finally:
            pusher.stop(final_push=False)
    assert pusher.status.pushes_failed == 0
    assert [r for r in state.requests if r.status == 401] == []
    assert sum(r.path == "/api/v1/auth/refresh" for r in state.requests) >= 2
    assert sum(r.path == "/api/v1/auth/login" for r in state.requests) == 1


@pytest.mark.parametrize("new_key", [False, True], ids=["same-key", "new-signing-key"])
def test_a_manager_restart_mid_watch_is_repaired_within_one_interval(cluster, tmp_path, new_key):
    state = cluster["state"]
    pusher = factory.make_pusher(settings(cluster, tmp_path, api_kind="manager"))
    pusher.start()
    try:
        pusher.update([Target(101, 101, "nr-gnb")])
        assert wait_for(lambda: watch_policies(state), 3.0) is not None
        if new_key:  # tokens issued before the restart are void afterwards
            state.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ours = [pid for pid, p in state.policies.items() if OURS.fullmatch(p["commandRegex"]) and p["nodeNames"] == [NODE]]
        cluster["manager"].stop()
        for pid in ours:  # its store lost our policy while it was down (e.g. the CR was deleted)
            del state.policies[pid]
        time.sleep(1.5)
        cluster["manager"].restart()
        restored = wait_for(lambda: watch_policies(state), 3.0)
        assert restored is not None and restored < 1.6, restored  # one interval (1 s) plus the push itself
        assert len(watch_policies(state)) == 1 and others_untouched(cluster)
    finally:
        pusher.stop(final_push=False)


def test_a_create_answered_500_after_storing_leaves_no_duplicate(cluster, tmp_path):
    """v1.3.0 stores the policy, then fails to reach the Decision Maker and answers 500."""
    state = cluster["state"]
    state.fail_create_after_insert = 1
    pusher = factory.make_pusher(settings(cluster, tmp_path, api_kind="manager"))
    pusher.start()
    try:
        pusher.update([Target(101, 101, "nr-gnb")])
        assert wait_for(lambda: pusher.status.pushes_ok >= 1, 4.0) is not None
        time.sleep(1.2)
    finally:
        pusher.stop(final_push=False)
    assert len(watch_policies(state)) == 1
    assert [r.method for r in state.writes()] == ["POST"]  # not posted again: the next push found it


# --- the Decision Maker --------------------------------------------------------------------------------


@host_pids
def test_the_decision_maker_shows_every_process_it_boosts_by_comm(cluster, tmp_path):
    state = cluster["state"]
    with workload.start("nr-gnb", threads=1, rate=1) as valid, workload.start("nr-gnb", threads=0, rate=1) as impostor:
        pusher = factory.make_pusher(settings(cluster, tmp_path, api_kind="manager", dm_url=cluster["dm"].url))
        pusher.start()
        try:
            pusher.update([Target(valid.pid, valid.pid, "nr-gnb"), *(Target(t, valid.pid, "nr-gnb") for t in valid.ready.tids)])
            assert wait_for(lambda: pusher.status.boosted, 4.0) is not None
        finally:
            pusher.stop(final_push=False)
        st = pusher.status
        assert valid.pid in st.boosted and impostor.pid in st.boosted and 1 not in st.boosted  # not the pod intent
        # (other tests on this host may run processes named nr-gnb too: they are unvalidated as well)
        assert impostor.pid in st.boosted_unvalidated and valid.pid not in st.boosted_unvalidated
    assert state.writes()[0].method == "POST"


def test_a_hanging_decision_maker_does_not_hold_back_the_next_change(cluster, tmp_path):
    """The Decision Maker is read on every push; one that accepts connections and never answers must not
    delay the Manager's policy (the promise: a change reaches the server within 1 s)."""
    state = cluster["state"]
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def hold() -> None:
        try:
            while True:
                held.append(listener.accept()[0])
        except OSError:  # the listener was closed
            pass

    threading.Thread(target=hold, daemon=True).start()
    pusher = factory.make_pusher(settings(cluster, tmp_path, api_kind="manager",
                                          dm_url=f"http://127.0.0.1:{listener.getsockname()[1]}"))
    pusher.start()
    try:
        pusher.update([Target(101, 101, "nr-gnb")])
        assert wait_for(lambda: watch_policies(state), 2.0) is not None
        time.sleep(0.3)  # the first push is now waiting for the Decision Maker
        pusher.update([Target(101, 101, "nr-gnb"), Target(201, 201, "nr-ue")])
        latency = wait_for(lambda: "nr-ue" in watch_policies(state)[0]["commandRegex"], 5.0)
        assert latency is not None and latency < 1.0, latency
    finally:
        t0 = time.monotonic()
        pusher.stop(final_push=False)
        assert time.monotonic() - t0 < 5.0
        listener.close()
        for conn in held:
            conn.close()


# --- the CLI against the Manager ------------------------------------------------------------------------


@pytest.fixture
def run(cluster, tmp_path):
    env = {"GTP5G_OP_API_URL": cluster["manager"].url, "GTP5G_OP_USERNAME": USER, "GTP5G_OP_PASSWORD": PASSWORD,
           "GTP5G_OP_STATE_DIR": str(tmp_path / "state"), "NODE_NAME": NODE, "COLUMNS": "80"}

    def invoke(*args: str, **extra_env: str):
        return cli("strategies", *args, env={**env, **extra_env})

    return invoke


def test_strategies_push_list_delete_prune_by_comm(cluster, run):
    state = cluster["state"]
    res = run("push", "--comm", "nr-ue", "--comm", "upf-helper", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["created"] == ["nr-ue", "upf-helper"]
    listed = json.loads(run("list", "--json").output)
    by_regex = {p["commandRegex"]: p for p in listed["policies"]}
    assert by_regex["^(?P<gtp5g_op_manual>)(?:nr-ue)$"]["owner"] == "manual"
    assert by_regex["^(?P<gtp5g_op_manual>)(?:nr-ue)$"]["this_node"] is True
    assert by_regex["^iperf3$"]["owner"] is None and by_regex["^iperf3$"]["this_node"] is True
    assert by_regex["^(?P<gtp5g_op>)(?:nr-ue)$"]["this_node"] is False  # node-b's
    assert by_regex["^chronyd$"]["this_node"] is None  # by node label: only the Manager can tell
    assert "^nr-gnb$" not in by_regex  # alice's: /self lists only this user's policies
    res = run("list")
    assert res.exit_code == 0 and "upf-helper" in res.output and all(len(line) <= 80 for line in res.output.splitlines())

    res = run("push", "--comm", "chronyd")  # the node-selector policy may cover this node: refused
    assert res.exit_code == EXIT_FAIL and "^chronyd$" in one_line_error(res.output)
    res = run("delete", "--comm", "nr-ue")
    assert res.exit_code == 0, res.output
    res = run("delete", "--comm", "iperf3")
    assert res.exit_code == EXIT_FAIL and "change that policy instead" in one_line_error(res.output)
    res = run("prune", "--json")
    assert [p["comms"] for p in json.loads(res.output)["removed"]] == [["upf-helper"]]
    assert others_untouched(cluster)
    assert not [p for p in state.policies_of(USER) if "gtp5g_op_manual" in p["commandRegex"]]


def test_wrong_password_is_one_line_naming_the_url_and_the_servers_words(cluster, run):
    res = run("list", GTP5G_OP_PASSWORD="not-it")
    assert res.exit_code == EXIT_API
    line = one_line_error(res.output)
    assert f"{cluster['manager'].url}/api/v1/auth/login" in line and "invalid password" in line
    assert "not-it" not in res.output
    res = run("push", "--comm", "nr-gnb", GTP5G_OP_USERNAME="viewer", GTP5G_OP_PASSWORD="viewer-pw")
    assert res.exit_code == EXIT_API and "permission denied" in one_line_error(res.output)
    res = run("list", GTP5G_OP_USERNAME="newbie", GTP5G_OP_PASSWORD="newbie-pw")
    assert res.exit_code == EXIT_API and "password change required" in one_line_error(res.output)
    res = run("push", "--comm", "nr-gnb", NODE_NAME="no-such-node")
    assert res.exit_code == EXIT_API and "no nodes match" in one_line_error(res.output)
    assert cluster["state"].writes() and not watch_policies(cluster["state"])


def test_watch_push_with_refused_credentials_stops_at_once_with_one_line(cluster, legacy, tmp_path, caplog):
    """A watch could never push with these: exit 4 before tracing, naming the URL and the server's words."""
    down = load_settings(env={"GTP5G_OP_PASSWORD": PASSWORD}, api_url=f"http://127.0.0.1:{free_port()}",
                         api_kind="manager", username=USER)
    assert factory.preflight(down) == MANAGER  # no answer yet: the pusher logs in once it answers
    assert "cannot log in to" in caplog.text and "pushing once it answers" in caplog.text

    env = {"GTP5G_OP_STATE_DIR": str(tmp_path / "state"), "NODE_NAME": NODE, "GTP5G_OP_USERNAME": USER}
    watch = ["watch", "--replay", "--push", "--no-validate", "--interval", "1"]
    url = cluster["manager"].url
    for password, user, words in (("not-it", USER, "HTTP 401: invalid password"),
                                  ("newbie-pw", "newbie", "HTTP 403: password change required")):
        res = cli(*watch, "--api-url", url, "--username", user, env={**env, "GTP5G_OP_PASSWORD": password})
        line = one_line_error(res.output)
        assert res.exit_code == EXIT_API and url in line and words in line and password not in res.output
    pub = tmp_path / "other.pub"
    pub.write_bytes(cluster["state"].public_pem())  # not the legacy server's key
    res = cli(*watch, "--api-url", legacy.url, "--public-key", str(pub), env=env)
    assert res.exit_code == EXIT_API and "Public key verification failed" in one_line_error(res.output)
    res = cli(*watch, "--api", "legacy", "--api-url", url, "--public-key", str(pub), env=env)
    assert res.exit_code == EXIT_API and "--api manager" in one_line_error(res.output)
    assert cluster["state"].writes() == [] and legacy.state.writes() == []


def test_doctor_fails_a_manager_user_who_may_log_in_but_not_read_policies(cluster, tmp_path):
    for user, password, words in (("newbie", "newbie-pw", "password change required"), (USER, PASSWORD, None)):
        s = load_settings(env={"GTP5G_OP_PASSWORD": password}, api_url=cluster["manager"].url, username=user)
        check = {c.name: c for c in doctor.api_checks(s)}["API login"]
        if words:
            assert check.status == doctor.FAIL and words in check.detail and "change its password" in check.fix
        else:
            assert check.ok and "may read its node policies (3 now)" in check.detail


# --- the legacy API -------------------------------------------------------------------------------------


def test_legacy_watch_and_strategies_against_an_independent_legacy_server(legacy, tmp_path):
    state = legacy.state
    pub = tmp_path / "legacy.pub"
    pub.write_bytes(state.public_pem())
    state.legacy_posted = [{"priority": True, "execution_time": 20000, "selectors": [{"key": "app", "value": "ueransim-macvlan"}],
                            "command_regex": "nr-gnb|nr-ue|ping"}]
    s = load_settings(env={}, api_url=legacy.url, public_key=str(pub), state_dir=str(tmp_path / "state"), interval=1.0)
    pusher = factory.make_pusher(s)
    pusher.start()
    try:
        pusher.update([Target(os.getpid(), os.getpid(), "python3")])
        assert wait_for(lambda: any(e.get("pid") == os.getpid() for e in state.legacy_posted or []), 3.0) is not None
        pusher.update([])
        assert wait_for(lambda: not any(e.get("pid") for e in state.legacy_posted or []), 3.0) is not None
    finally:
        pusher.stop(final_push=False)
    # the server's own selector strategy survived every merge, with its regex
    assert state.legacy_posted == [{"priority": True, "execution_time": 20000,
                                    "selectors": [{"key": "app", "value": "ueransim-macvlan"}],
                                    "command_regex": "nr-gnb|nr-ue|ping"}]

    env = {"GTP5G_OP_API_URL": legacy.url, "GTP5G_OP_PUBLIC_KEY": str(pub), "GTP5G_OP_STATE_DIR": str(tmp_path / "state")}
    with subprocess.Popen(["sleep", "30"]) as sleeper:
        try:
            assert cli("strategies", "push", "--pid", str(sleeper.pid), env=env).exit_code == 0
            rows = json.loads(cli("strategies", "list", "--json", env=env).output)
            assert {r.get("pid") for r in rows} == {4242, sleeper.pid}
            assert cli("strategies", "delete", "--pid", str(sleeper.pid), env=env).exit_code == 0
            assert cli("strategies", "push", "--pid", str(sleeper.pid), env=env).exit_code == 0
            res = cli("strategies", "prune", env=env)
            assert res.exit_code == 0 and str(sleeper.pid) in res.output
        finally:
            sleeper.kill()
    state.legacy_posted = None  # a server where nothing was ever posted answers "scheduling": null
    res = cli("strategies", "list", "--json", env=env)
    assert res.exit_code == 0 and json.loads(res.output) == []
    res = cli("strategies", "--public-key", str(tmp_path / "legacy.pub"), "list", env={**env, "GTP5G_OP_API_URL": legacy.url + "/"})
    assert res.exit_code == 0


# --- the project's test server says what the real servers say -------------------------------------------


PROBES = [
    ("POST", "/api/v1/auth/login", {}),
    ("GET", "/api/v1/auth/login", None),
    ("POST", "/api/v1/auth/token", {}),
    ("PUT", "/api/v1/node-scheduling-policies/self", {}),
    ("GET", "/api/v1/node-scheduling-policies", None),
    ("GET", "/api/v1/node-scheduling-policies/self", None),
    ("DELETE", "/api/v1/node-scheduling-policies", {"policyId": "0" * 24}),
    ("POST", "/api/v1/auth/login/", {}),
    ("GET", "/api/v1/node-intents/merkle", None),
    ("GET", "/", None),
    ("POST", "/health", None),
    ("GET", "/health", None),
    ("GET", "/version", None),
    ("HEAD", "/health", None),
    ("GET", "/api", None),
    ("POST", "/api/v1/scheduling/strategies", {"strategies": []}),
    ("GET", "/api/v1/scheduling/strategies", None),
    ("OPTIONS", "/api/v1/scheduling/strategies", None),
    ("DELETE", "/api/v1/auth/token", None),
    ("GET", "/static/x", None),
    ("POST", "/api/v1/node-scheduling-policies", {"priority": True}),
    ("POST", "/api/v1/auth/login", {"username": "a", "password": ""}),
    ("POST", "/api/v1/auth/login", None),
    ("POST", "/api/v1/auth/refresh", {}),
    ("POST", "/api/v1/auth/logout", {}),
    ("GET", "/api/v1/node-scheduling-intents/self", None),
    ("POST", "/api/v1/node-intents", {"policies": []}),
]


def _answer(url: str, method: str, path: str, body) -> tuple[int, str]:
    resp = requests.request(method, url + path, json=body, timeout=5, allow_redirects=False)
    ctype = resp.headers.get("Content-Type", "").split(";")[0]
    try:
        doc = resp.json()
        shape = "error" if isinstance(doc, dict) and doc.get("success") is False else \
            "echo" if isinstance(doc, dict) and set(doc) == {"message"} else "json"
    except ValueError:
        shape = ctype or "empty"
    return resp.status_code, shape


@pytest.mark.parametrize("mode", ["manager", "dm", "legacy"])
def test_the_projects_test_server_answers_probes_like_the_real_servers(tmp_path, mode):
    """Status and kind of answer for requests a client (or auto-detection) may make, compared with the
    independent servers (which follow echo's and gorilla/mux's routing as the real servers do)."""
    args = manager_args() if mode == "manager" else ["--mode", mode] if mode == "dm" else []
    theirs = start_server(tmp_path / "ts", *args)
    mine = Server(mode).serve()
    try:
        for method, path, body in PROBES:
            assert _answer(theirs.url, method, path, body) == _answer(mine.url, method, path, body), (method, path)
    finally:
        theirs.stop()
        mine.stop()


# --- live: a real nr-gnb traced by the selftest probe, pushed to the independent Manager -----------------


@host_pids
def test_live_watch_pushes_nr_gnb_to_the_manager_within_a_second(selftest_probe, cluster, tmp_path):
    state = cluster["state"]
    state.access_ttl = 3
    instance = f"gtp5g-op-indep-{os.getpid()}"
    pw = tmp_path / "password"
    pw.write_text(PASSWORD + "\n")
    pub = tmp_path / "dm.pub"
    pub.write_bytes(state.public_pem())
    cmd = [sys.executable, "-m", "gtp5g_op", "watch", "--push", "--json", "--interval", "1", "-v", "--instance", instance,
           "--api-url", cluster["manager"].url, "--username", USER, "--password-file", str(pw), "--node-name", NODE,
           "--dm-url", cluster["dm"].url, "--public-key", str(pub)]
    watch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "GTP5G_OP_STATE_DIR": str(tmp_path / "state")})
    pipe = Path("/sys/kernel/tracing/instances") / instance / "trace_pipe"
    try:
        assert wait_for(lambda: pipe.exists() or watch.poll() is not None, 15) is not None and watch.poll() is None
        time.sleep(0.3)
        with workload.start("nr-gnb", threads=3, rate=200) as wl:
            latency = wait_for(lambda: watch_policies(state), 5)
            assert latency is not None and latency < 1.0, latency
            assert [p["commandRegex"] for p in watch_policies(state)] == ["^(?P<gtp5g_op>)(?:nr-gnb)$"]
            time.sleep(3.5)  # an access token lapses meanwhile
        gone = wait_for(lambda: not watch_policies(state), 5)
        assert gone is not None and gone < 2.5, gone  # the process left: the policy goes within an interval or so
    finally:
        watch.send_signal(15)
        out, err = watch.communicate(timeout=20)
    assert watch.returncode == 0, err.decode()[-2000:]
    report = json.loads(out)
    assert report["push"]["api"] == "manager" and report["push"]["pushes_failed"] == 0
    assert wl.pid in (report["push"]["boosted"] or []) or report["push"]["boosted"] == []
    assert b"is a Gthulhu v1.x Manager (auto-detected" in err
    assert PASSWORD.encode() not in out + err and b"eyJ" not in out + err
    assert others_untouched(cluster) and not (Path("/sys/kernel/tracing/instances") / instance).exists()
    print(f"policy on the Manager {latency:.3f} s after nr-gnb started; gone {gone:.2f} s after it ended")


@host_pids
def test_live_watch_pushes_nr_gnb_threads_to_the_legacy_server_within_a_second(selftest_probe, legacy, tmp_path):
    state = legacy.state
    state.legacy_ttl = 2  # tokens lapse during the run
    instance = f"gtp5g-op-indep-legacy-{os.getpid()}"
    pub = tmp_path / "legacy.pub"
    pub.write_bytes(state.public_pem())
    cmd = [sys.executable, "-m", "gtp5g_op", "watch", "--push", "--json", "--interval", "1", "-v", "--instance", instance,
           "--api-url", legacy.url, "--public-key", str(pub)]
    watch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "GTP5G_OP_STATE_DIR": str(tmp_path / "state")})
    pipe = Path("/sys/kernel/tracing/instances") / instance / "trace_pipe"

    def pids() -> set[int]:
        return {e["pid"] for e in state.legacy_posted or [] if "pid" in e}

    try:
        assert wait_for(lambda: pipe.exists() or watch.poll() is not None, 15) is not None and watch.poll() is None
        time.sleep(0.3)
        with workload.start("nr-gnb", threads=3, rate=200) as wl:
            expected = {wl.pid, *wl.ready.tids}
            latency = wait_for(lambda: expected <= pids(), 5)
            assert latency is not None and latency < 1.0, latency
            time.sleep(2.5)
        gone = wait_for(lambda: not (expected & pids()), 5)
        assert gone is not None and gone < 2.5, gone
    finally:
        watch.send_signal(15)
        out, err = watch.communicate(timeout=20)
    assert watch.returncode == 0, err.decode()[-2000:]
    report = json.loads(out)
    assert report["push"]["api"] == "legacy" and report["push"]["pushes_failed"] == 0
    assert b"is a legacy Gthulhu API server (auto-detected" in err and b"eyJ" not in out + err
    print(f"PID strategies on the legacy server {latency:.3f} s after nr-gnb started; gone {gone:.2f} s after it ended")
