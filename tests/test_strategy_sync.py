"""Policy → strategies, ownership and merge, and StrategyPusher against a real test-server process."""

from __future__ import annotations

import logging
import time

import pytest

from gtp5g_op.config import Policy, Rule
from gtp5g_op.gthulhu.legacy import GthulhuClient, LegacyBackend, merge, target_strategies
from gtp5g_op.gthulhu.ownership import MANUAL, WATCH, OwnershipStore
from gtp5g_op.gthulhu.sync import StrategyPusher
from gtp5g_op.model import Target

APP = [{"key": "app", "value": "ueransim-macvlan"}]
DEFAULT_SELECTOR = {"priority": True, "execution_time": 20000000, "selectors": APP, "command_regex": "nr-gnb|nr-ue|ping"}


def _t(pid: int, comm: str = "nr-gnb") -> Target:
    return Target(pid=pid, tgid=pid, comm=comm)


def _wait(pred, timeout: float, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


def _pusher(server, tmp_path, replace: bool = False, **kw) -> StrategyPusher:
    client = GthulhuClient(server.url, server.public_key.read_bytes(), timeout=(1, 1), retries=1, backoff_factor=0.05)
    kw.setdefault("interval", 10.0)
    backend = LegacyBackend(client, Policy(), store=OwnershipStore(server.url, tmp_path / "state"), replace=replace)
    return StrategyPusher(backend, **kw)


# --- pure functions -------------------------------------------------------------------------------


def test_policy_defaults_and_per_comm_overrides():
    policy = Policy(overrides=(Rule(comm="^nr-ue$", execution_time_ns=5_000_000), Rule(comm="gnb", priority=False)))
    got = target_strategies([_t(30, "nr-ue"), _t(10), _t(20, "other"), _t(10)], policy)
    assert got == [
        {"priority": False, "execution_time": 20000000, "pid": 10},
        {"priority": True, "execution_time": 20000000, "pid": 20},
        {"priority": True, "execution_time": 5000000, "pid": 30},
    ]


def test_merge_keeps_foreign_and_collapses_selector_expansions():
    server = [
        {"priority": True, "execution_time": 20000000, "pid": 4242, "selectors": APP},  # expanded, regex lost
        {"priority": True, "execution_time": 20000000, "pid": 4243, "selectors": APP},
        {"priority": False, "execution_time": 1, "pid": 77, "selectors": [{"key": "x", "value": "y"}]},
        {"priority": True, "execution_time": 20000000, "pid": 500},  # someone else's PID
        {"priority": True, "execution_time": 20000000, "pid": 500},  # duplicate
        {"priority": True, "execution_time": 20000000, "pid": 600},  # ours from before: process died
        {"priority": False, "execution_time": 3, "pid": 700},  # someone else's, but we target 700 now
    ]
    desired = [{"priority": True, "execution_time": 20000000, "pid": 700}, {"priority": True, "execution_time": 20000000, "pid": 800}]
    result = merge(server, desired, owned={600})
    assert result.body == [
        DEFAULT_SELECTOR,  # regex restored from the known selector strategies
        {"priority": False, "execution_time": 1, "selectors": [{"key": "x", "value": "y"}]},
        {"priority": True, "execution_time": 20000000, "pid": 500},
        *desired,
    ]
    assert result.foreign_pids == [500] and result.selector_strategies == 2 and result.regex_lost == ["x=y"]


def test_ownership_store_keeps_watch_and_manual_apart(tmp_path):
    store = OwnershipStore("http://127.0.0.1:9/", tmp_path)
    store.change(set_watch={1, 2})
    store.change(add_manual=[3, 2])  # 2 stays watch-owned
    assert store.load() == {1: WATCH, 2: WATCH, 3: MANUAL}
    store.change(set_watch={5})
    assert store.load() == {3: MANUAL, 5: WATCH}
    assert store.path.name == "owned-127.0.0.1_9.json" and "token" not in store.path.read_text()
    store.path.write_text("{garbage")
    assert store.load() == {}


# --- the pusher against a real server ------------------------------------------------------------


def test_first_push_is_fast_merges_and_dead_processes_leave(gthulhu_server, tmp_path):
    gthulhu_server.control(strategies=[DEFAULT_SELECTOR, {"priority": True, "execution_time": 1, "pid": 999}])
    pusher = _pusher(gthulhu_server, tmp_path)
    pusher.start()
    started = time.monotonic()
    pusher.update([_t(101), _t(102, "nr-ue")])
    assert _wait(lambda: gthulhu_server.pids() >= {101, 102}, 1.0)
    assert time.monotonic() - started < 1.0
    raw = gthulhu_server.state()["strategies"]
    assert DEFAULT_SELECTOR in raw and {"priority": True, "execution_time": 1, "pid": 999} in raw  # foreign kept
    pusher.update([_t(102, "nr-ue")])  # 101 died
    assert _wait(lambda: gthulhu_server.pids() == {102, 999}, 2.0)
    assert pusher.stop(final_push=True) is True
    st = pusher.status
    assert st.pushes_ok >= 3 and st.pushes_failed == 0 and st.last_change_latency < 1.0 and st.foreign_kept == 2
    assert sum(1 for s in gthulhu_server.state()["strategies"] if s.get("selectors")) == 1  # never duplicated


def test_replace_drops_foreign_entries(gthulhu_server, tmp_path):
    gthulhu_server.control(strategies=[{"priority": True, "execution_time": 1, "pid": 999}])
    pusher = _pusher(gthulhu_server, tmp_path, replace=True)
    pusher.start()
    pusher.update([_t(101)])
    assert _wait(lambda: gthulhu_server.pids() == {101}, 2.0)
    pusher.stop(final_push=False)
    assert gthulhu_server.state()["strategies"] == [{"priority": True, "execution_time": 20000000, "pid": 101}]


def test_restarted_tool_removes_its_stale_entries(gthulhu_server, tmp_path):
    first = _pusher(gthulhu_server, tmp_path)
    first.start()
    first.update([_t(101), _t(102)])
    assert first.stop(final_push=True)
    # the tool stops, 101 dies meanwhile; a new run only knows 102 but the ownership file knows 101
    second = _pusher(gthulhu_server, tmp_path)
    second.start()
    second.update([_t(102)])
    assert _wait(lambda: gthulhu_server.pids() == {102}, 2.0)
    second.stop(final_push=False)


def test_periodic_resend_repopulates_a_restarted_server(gthulhu_server, tmp_path):
    pusher = _pusher(gthulhu_server, tmp_path, interval=1.0)
    pusher.start()
    pusher.update([_t(101)])
    assert _wait(lambda: gthulhu_server.pids() == {101}, 2.0)
    gthulhu_server.restart()
    restarted = time.monotonic()
    assert gthulhu_server.pids() == set()
    assert _wait(lambda: gthulhu_server.pids() == {101}, 2.0)
    assert time.monotonic() - restarted <= 2.0  # within one interval (1 s) plus slack for a loaded host
    assert DEFAULT_SELECTOR in gthulhu_server.state()["strategies"]
    pusher.stop(final_push=False)


def test_token_expiry_mid_watch_costs_no_push(tmp_path, gthulhu_start):
    server = gthulhu_start("--token-lifetime", "2")
    pusher = _pusher(server, tmp_path, interval=0.3)
    pusher.start()
    pusher.update([_t(101)])
    time.sleep(4.5)
    assert pusher.stop(final_push=True)
    st = pusher.status
    assert st.pushes_failed == 0 and st.token_renewals >= 3
    assert "token_expired" not in server.state()["stats"]


@pytest.mark.parametrize("fault", ["500", "down", "bad-json", "401", "stopped"])
def test_outage_is_logged_once_and_the_full_set_pushed_after(gthulhu_server, tmp_path, caplog, fault):
    caplog.set_level(logging.DEBUG)
    pusher = _pusher(gthulhu_server, tmp_path, interval=0.5)
    pusher.start()
    pusher.update([_t(101)])
    assert _wait(lambda: gthulhu_server.pids() == {101}, 2.0)
    if fault == "stopped":
        gthulhu_server.stop()
    else:
        gthulhu_server.control(fault=fault)
    pusher.update([_t(101), _t(102), _t(103)])  # changes during the outage are kept
    assert _wait(lambda: pusher.status.pushes_failed >= 3, 8.0)
    if fault == "stopped":
        gthulhu_server.start()
    gthulhu_server.control(fault=None)
    assert _wait(lambda: gthulhu_server.pids() == {101, 102, 103}, 3.0)
    token = pusher.client._token.reveal()  # stop() closes the client, which forgets the token
    pusher.stop(final_push=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("cannot push strategies" in m for m in warnings) == 1, warnings
    assert sum("is back after" in m for m in warnings) == 1
    assert not any("Retrying" in m for m in warnings)
    assert token and all(token not in r.getMessage() for r in caplog.records)


def test_slow_server_never_blocks_stop_past_its_timeout(gthulhu_server, tmp_path):
    pusher = _pusher(gthulhu_server, tmp_path)
    pusher.client.authenticate()
    gthulhu_server.control(fault="slow", slow_seconds=5)
    pusher.start()
    pusher.update([_t(101)])
    time.sleep(0.4)  # the push is now in flight, waiting on the slow server
    started = time.monotonic()
    assert pusher.stop(final_push=False, timeout=0.5) is False
    assert time.monotonic() - started < 1.0


def test_final_push_reports_failure(gthulhu_server, tmp_path):
    pusher = _pusher(gthulhu_server, tmp_path)
    pusher.start()
    pusher.update([_t(101)])
    gthulhu_server.stop()
    assert pusher.stop(final_push=True) is False
    assert pusher.status.last_error and "cannot connect" in pusher.status.last_error


def test_metrics_hear_about_pushes_and_renewals(gthulhu_server, tmp_path):
    from gtp5g_op.ops.metrics import Metrics

    metrics = Metrics()
    pusher = _pusher(gthulhu_server, tmp_path)
    pusher.metrics = metrics
    pusher.start()
    pusher.update([_t(101)])
    assert _wait(lambda: gthulhu_server.pids() == {101}, 2.0)
    assert pusher.stop(final_push=True)
    value = metrics.registry.get_sample_value
    assert value("gtp5g_op_pushes_total", {"result": "ok"}) >= 2
    assert value("gtp5g_op_token_renewals_total") == 1
