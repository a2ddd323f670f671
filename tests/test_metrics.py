"""Metrics: real HTTP scrapes on 127.0.0.1, counters moving, /healthz and /livez transitions."""

from __future__ import annotations

import socket
import time

import pytest
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gtp5g_op.errors import EnvironmentProblem
from gtp5g_op.ops.metrics import PUSH_AGE_FACTOR, Metrics, push_max_age


def scrape(port: int) -> dict[str, float]:
    """Scrape /metrics and parse it with prometheus-client's own parser: sample name{labels} -> value."""
    resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def get(port: int, path: str) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{port}{path}", timeout=5)


@pytest.fixture
def served():
    started: list[Metrics] = []

    def start(**kwargs) -> Metrics:
        metrics = Metrics(**kwargs)
        metrics.serve(0, host="127.0.0.1")
        started.append(metrics)
        return metrics

    yield start
    for metrics in started:
        metrics.stop()


def test_counters_gauges_histogram_move(served):
    m = served()
    before = scrape(m.port)
    for name in ("gtp5g_op_lines_total", "gtp5g_op_events_total", "gtp5g_op_matched_events_total",
                 "gtp5g_op_malformed_lines_total", "gtp5g_op_lost_events_total", "gtp5g_op_targets",
                 "gtp5g_op_threads", "gtp5g_op_token_renewals_total",
                 'gtp5g_op_pushes_total{result="ok"}', 'gtp5g_op_pushes_total{result="failed"}',
                 "gtp5g_op_push_latency_seconds_count"):
        assert before[name] == 0, name

    m.observe_parse(lines=100, events=90, matched=44, malformed=2, lost=3)
    m.observe_parse(lines=10, events=10)  # deltas add up
    m.set_tracked(targets=2, threads=22)
    m.observe_push(True, 0.012)
    m.observe_push(False, 3.0)
    m.token_renewed()
    m.observe_rejected(["dead", "exe", "dead"])
    after = scrape(m.port)

    assert after["gtp5g_op_lines_total"] == 110
    assert after["gtp5g_op_events_total"] == 100
    assert after["gtp5g_op_matched_events_total"] == 44
    assert after["gtp5g_op_malformed_lines_total"] == 2
    assert after["gtp5g_op_lost_events_total"] == 3
    assert after["gtp5g_op_targets"] == 2 and after["gtp5g_op_threads"] == 22
    assert after['gtp5g_op_pushes_total{result="ok"}'] == 1
    assert after['gtp5g_op_pushes_total{result="failed"}'] == 1
    assert after["gtp5g_op_push_latency_seconds_count"] == 2
    assert after["gtp5g_op_push_latency_seconds_sum"] == pytest.approx(3.012)
    assert after['gtp5g_op_push_latency_seconds_bucket{le="0.025"}'] == 1
    assert after['gtp5g_op_push_latency_seconds_bucket{le="+Inf"}'] == 2
    assert after["gtp5g_op_token_renewals_total"] == 1
    assert after['gtp5g_op_rejected_total{reason="dead"}'] == 2
    assert after['gtp5g_op_rejected_total{reason="exe"}'] == 1
    assert abs(after["gtp5g_op_last_successful_push_timestamp_seconds"] - time.time()) < 60
    assert any(k.startswith("gtp5g_op_build_info{") for k in after)


def test_registries_are_private():
    a, b = Metrics(), Metrics()  # a shared (global) registry would refuse the second set of names
    a.observe_parse(lines=5)
    assert b.registry.get_sample_value("gtp5g_op_lines_total") == 0
    reg = CollectorRegistry()
    assert Metrics(reg).registry is reg


def test_openmetrics_negotiation(served):
    m = served()
    resp = requests.get(f"http://127.0.0.1:{m.port}/metrics", timeout=5,
                        headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert resp.text.rstrip().endswith("# EOF")


def test_healthz_follows_the_pipe_heartbeat(served):
    m = served(read_max_age=0.3)
    assert get(m.port, "/healthz").status_code == 200
    assert get(m.port, "/healthz").text == "ok\n"
    time.sleep(0.5)  # nobody called mark_read()
    for path in ("/healthz", "/livez"):
        resp = get(m.port, path)
        assert resp.status_code == 503
        assert resp.text.startswith("trace pipe not read for")
    m.mark_read()  # an idle poll tick counts
    assert get(m.port, "/healthz").status_code == 200
    assert get(m.port, "/livez").status_code == 200


def test_healthz_needs_a_recent_push_when_pushing(served):
    m = served(read_max_age=60, push_max_age=0.4)
    assert get(m.port, "/healthz").status_code == 200  # grace period for the first push
    time.sleep(0.6)
    m.mark_read()
    resp = get(m.port, "/healthz")
    assert resp.status_code == 503 and resp.text.startswith("no successful push for")
    assert get(m.port, "/livez").status_code == 200  # liveness ignores the API
    m.observe_push(False, 0.1)
    assert get(m.port, "/healthz").status_code == 503  # a failed push does not count
    m.observe_push(True, 0.1)
    assert get(m.port, "/healthz").status_code == 200


def test_custom_health_callable_and_404(served):
    m = Metrics()
    server = m.serve(0, host="127.0.0.1", health=lambda: (False, "custom says no"))
    try:
        resp = get(server.port, "/healthz")
        assert (resp.status_code, resp.text) == (503, "custom says no\n")
        assert get(server.port, "/nope").status_code == 404
    finally:
        m.stop()
    assert m.port is None


def test_busy_port_is_an_environment_problem():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(EnvironmentProblem) as err:
            Metrics().serve(port, host="127.0.0.1")
    assert "--metrics-port" in err.value.fix


def test_push_max_age_helper():
    assert push_max_age(10.0) == 10.0 * PUSH_AGE_FACTOR == 30.0


def test_concurrent_scrapes_do_not_block(served):
    """A scraper holding a connection open must not stall the probes (one thread per request)."""
    m = served()
    with socket.create_connection(("127.0.0.1", m.port)) as idle:
        idle.sendall(b"GET /metrics HTTP/1.1\r\n")  # never finishes its request
        start = time.monotonic()
        assert get(m.port, "/livez").status_code == 200
        assert time.monotonic() - start < 2


# --- hostile scrapers (issue 11 item 8) ---------------------------------------------------------------

def _other_local_ip() -> str | None:
    """An IPv4 address of this host that is not loopback, if there is one."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_binds_loopback_by_default_and_only_ip_addresses():
    from gtp5g_op.errors import UsageError

    m = Metrics()
    m.serve(0)
    try:
        assert get(m.port, "/livez").status_code == 200
        other = _other_local_ip()
        if other:
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((other, m.port)) != 0, f"reachable on {other}"
    finally:
        m.stop()
    with pytest.raises(UsageError, match="not an IP address"):
        Metrics().serve(0, host="gthulhu.example; rm -rf /")
    m6 = Metrics()
    m6.serve(0, host="::1")
    try:
        assert requests.get(f"http://[::1]:{m6.port}/livez", timeout=5).status_code == 200
    finally:
        m6.stop()


def test_330_idle_half_sent_requests_hold_no_threads_and_probes_still_answer(served):
    import threading

    m = served()
    before = threading.active_count()
    conns = []
    try:
        for _ in range(330):
            c = socket.create_connection(("127.0.0.1", m.port))
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
            conns.append(c)
        time.sleep(0.5)
        assert threading.active_count() - before <= 1, threading.active_count() - before
        started = time.monotonic()
        assert get(m.port, "/livez").status_code == 200 and get(m.port, "/healthz").status_code == 200
        assert time.monotonic() - started < 1.0
        # Per-connection timeout: the idle ones are closed by the server after IDLE_TIMEOUT (+1 s sweep).
        from gtp5g_op.ops.metrics import IDLE_TIMEOUT

        deadline = time.monotonic() + IDLE_TIMEOUT + 5
        closed = 0
        for c in conns:
            c.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                closed += c.recv(1) == b""
            except (TimeoutError, ConnectionResetError):
                pass
        assert closed == 330
    finally:
        for c in conns:
            c.close()


def test_a_client_dripping_bytes_is_cut_off_at_the_connection_age_limit(monkeypatch):
    from gtp5g_op.ops import metrics as metrics_mod

    monkeypatch.setattr(metrics_mod, "MAX_CONNECTION_AGE", 2.0)
    m = Metrics()
    m.serve(0)
    try:
        with socket.create_connection(("127.0.0.1", m.port)) as c:
            c.settimeout(0.1)
            started = time.monotonic()
            request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
            for byte in request:  # one byte every 0.5 s: never idle long enough for IDLE_TIMEOUT
                try:
                    c.sendall(bytes([byte]))
                except OSError:
                    break
                try:
                    if c.recv(1) == b"":
                        break
                except TimeoutError:
                    pass
                time.sleep(0.4)
            took = time.monotonic() - started
        assert took < 2.0 + 1.0 + 1.5, took  # age limit, 1 s sweep, slack
    finally:
        m.stop()


def test_stop_is_prompt_with_clients_connected(served):
    m = Metrics()
    m.serve(0)
    c = socket.create_connection(("127.0.0.1", m.port))
    c.sendall(b"GET /")
    started = time.monotonic()
    m.stop()
    assert time.monotonic() - started < 3
    c.close()


def test_cli_metrics_addr_is_checked():
    from click.testing import CliRunner

    from gtp5g_op.cli import main

    out = CliRunner().invoke(main, ["watch", "--replay", "--metrics-port", "0", "--metrics-addr", "localhost"])
    assert out.exit_code == 2 and "is not an IP address" in out.output and "Traceback" not in out.output


def test_a_scraper_cannot_flood_the_watch_log(tmp_path):
    """Any local user can reach the loopback endpoint: 2 connections pipelining 2000 requests each made a
    real watch write ~400 "Task queue depth is 1" warnings (waitress's queue logger) into its log."""
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "gtp5g_op", "watch", "--trace-pipe", str(fifo), "--no-validate",
                             "--metrics-port", str(port), "--duration", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    writer = open(fifo, "wb")  # noqa: SIM115 - held open while the watch runs
    try:
        for _ in range(100):
            try:
                get(port, "/livez")
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for conn in flood:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
        time.sleep(3)
        assert get(port, "/livez").status_code == 200
        for conn in flood:
            conn.close()
    finally:
        writer.close()
        _, err = proc.communicate(timeout=30)
    assert b"Task queue depth" not in err, err.decode()[-500:]
    assert len(err.splitlines()) <= 2, err.decode()[-2000:]
