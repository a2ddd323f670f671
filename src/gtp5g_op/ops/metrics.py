"""Prometheus metrics of the watch pipeline and the HTTP endpoint that serves them with health checks.

The pipeline owns one :class:`Metrics` and feeds it deltas; ``watch --metrics-port`` calls
:meth:`Metrics.serve`, which answers:

* ``/metrics``: the Prometheus exposition (text or OpenMetrics, by the scraper's ``Accept`` header);
* ``/healthz``: 200 ``ok`` while the trace pipe is read and, when pushing, the last successful push is
  recent; 503 with the reason otherwise (Kubernetes readiness);
* ``/livez``: the trace-pipe half of the rule only (Kubernetes liveness: restarting the watcher does
  not bring an unreachable Gthulhu API back, so a push outage should make the pod unready, not kill it).

It binds 127.0.0.1 unless told otherwise (the DaemonSet binds the pod IP). Scrapers and probes may be
hostile too: connections are read by waitress's event loop, so an idle or half-sent request holds no
thread; a fixed pool of ``HTTP_THREADS`` threads runs complete requests; a connection idle for
``IDLE_TIMEOUT`` seconds, or open longer than ``MAX_CONNECTION_AGE`` without a request in progress
(a client dripping one byte at a time), is closed; at most ``MAX_CONNECTIONS`` are open at once.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)

from gtp5g_op import __version__
from gtp5g_op.errors import EnvironmentProblem, UsageError

log = logging.getLogger(__name__)

#: Seconds without a read of the trace pipe before health fails (the pipeline marks every poll tick).
DEFAULT_READ_MAX_AGE = 30.0
#: A push is "recent" while younger than this many push intervals.
PUSH_AGE_FACTOR = 3.0
#: Push latency buckets (seconds): a loopback push takes milliseconds, a retried one seconds.
PUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: The HTTP endpoint's limits (see the module doc).
DEFAULT_ADDR = "127.0.0.1"
HTTP_THREADS = 4
IDLE_TIMEOUT = 5  # seconds (waitress takes whole seconds)
MAX_CONNECTION_AGE = 30.0
MAX_CONNECTIONS = 1000
MAX_REQUEST_HEADER = 16 * 1024

Health = Callable[[], tuple[bool, str]]


def push_max_age(interval: float, factor: float = PUSH_AGE_FACTOR) -> float:
    """How old the last successful push may be for a pusher that pushes every ``interval`` seconds."""
    return factor * interval


class Metrics:
    """The watcher's counters, gauges and histogram in a registry of their own.

    Each instance gets a fresh :class:`~prometheus_client.CollectorRegistry` unless one is given, so
    tests and repeated runs in one process never collide on the global default registry.

    ``read_max_age``: health fails when :meth:`mark_read` was not called for this long.
    ``push_max_age``: when not None (pushing is on), health also fails when no push succeeded for this
    long; the clock starts at construction so a fresh watcher gets one full period to make its first push.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        read_max_age: float = DEFAULT_READ_MAX_AGE,
        push_max_age: float | None = None,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.read_max_age = read_max_age
        self.push_max_age = push_max_age
        now = time.monotonic()
        self._last_read = now
        self._last_push_ok = now
        self._server: MetricsServer | None = None
        reg = self.registry

        self.lines = Counter("gtp5g_op_lines", "Trace lines read.", registry=reg)
        self.events = Counter("gtp5g_op_events", "Tracer events parsed.", registry=reg)
        self.matched = Counter(
            "gtp5g_op_matched_events", "Events whose subject matched the target pattern.", registry=reg
        )
        self.malformed = Counter(
            "gtp5g_op_malformed_lines", "Tracer lines that could not be parsed.", registry=reg
        )
        self.lost = Counter(
            "gtp5g_op_lost_events", "Trace lines the kernel dropped (ring-buffer overruns).", registry=reg
        )
        self.targets = Gauge("gtp5g_op_targets", "Target processes tracked now.", registry=reg)
        self.threads = Gauge("gtp5g_op_threads", "Target threads tracked now.", registry=reg)
        self.pushes = Counter(
            "gtp5g_op_pushes", "Strategy pushes to the Gthulhu API, by result.", ["result"], registry=reg
        )
        for result in ("ok", "failed"):
            self.pushes.labels(result=result)
        self.push_latency = Histogram(
            "gtp5g_op_push_latency_seconds",
            "Duration of one strategy push, retries included.",
            buckets=PUSH_BUCKETS,
            registry=reg,
        )
        self.last_push_ok = Gauge(
            "gtp5g_op_last_successful_push_timestamp_seconds",
            "Unix time of the last successful push (0: none yet).",
            registry=reg,
        )
        self.token_renewals = Counter(
            "gtp5g_op_token_renewals", "API tokens obtained or renewed.", registry=reg
        )
        self.rejected = Counter(
            "gtp5g_op_rejected", "Subjects the validator rejected, by reason.", ["reason"], registry=reg
        )
        self.boosted = Gauge(
            "gtp5g_op_dm_boosted_pids",
            "PIDs the node's Gthulhu Decision Maker boosts under gtp5g-op's policies (v1.x, --dm-url), "
            "by whether gtp5g-op's validation accepted them.",
            ["validated"],
            registry=reg,
        )
        self.info = Gauge("gtp5g_op_build_info", "Version of gtp5g-op.", ["version"], registry=reg)
        self.info.labels(version=__version__).set(1)

    # -- what the pipeline calls ------------------------------------------------------------------

    def observe_parse(
        self, lines: int = 0, events: int = 0, matched: int = 0, malformed: int = 0, lost: int = 0
    ) -> None:
        """Add parser deltas (not running totals) since the previous call."""
        for counter, delta in (
            (self.lines, lines),
            (self.events, events),
            (self.matched, matched),
            (self.malformed, malformed),
            (self.lost, lost),
        ):
            if delta:
                counter.inc(delta)

    def set_tracked(self, targets: int, threads: int) -> None:
        """Set how many target processes and threads are tracked now."""
        self.targets.set(targets)
        self.threads.set(threads)

    def observe_push(self, ok: bool, latency: float) -> None:
        """Count one push and its duration; a successful one refreshes the push half of health."""
        self.pushes.labels(result="ok" if ok else "failed").inc()
        self.push_latency.observe(latency)
        if ok:
            self._last_push_ok = time.monotonic()
            self.last_push_ok.set_to_current_time()

    def token_renewed(self) -> None:
        """Count one token obtained from the API."""
        self.token_renewals.inc()

    def observe_boosted(self, validated: int, unvalidated: int) -> None:
        """What the Decision Maker boosts under gtp5g-op's policies: validated targets and other processes."""
        self.boosted.labels(validated="true").set(validated)
        self.boosted.labels(validated="false").set(unvalidated)

    def observe_rejected(self, reasons: Iterable[str]) -> None:
        """Count validator rejections, one per reason given (e.g. ``dead``, ``exe``, ``comm``)."""
        for reason in reasons:
            self.rejected.labels(reason=reason).inc()

    def mark_read(self) -> None:
        """Heartbeat of the reader: call on every poll of the trace pipe, even one that read nothing."""
        self._last_read = time.monotonic()

    # -- health -----------------------------------------------------------------------------------

    def live(self) -> tuple[bool, str]:
        """``(ok, reason)``: is the trace pipe being read?"""
        age = time.monotonic() - self._last_read
        if age > self.read_max_age:
            return False, f"trace pipe not read for {age:.0f}s (limit {self.read_max_age:.0f}s)"
        return True, "ok"

    def health(self) -> tuple[bool, str]:
        """``(ok, reason)``: the pipe is read and, when pushing, the last push succeeded recently."""
        ok, reason = self.live()
        if ok and self.push_max_age is not None:
            age = time.monotonic() - self._last_push_ok
            if age > self.push_max_age:
                ok, reason = False, f"no successful push for {age:.0f}s (limit {self.push_max_age:.0f}s)"
        return ok, reason

    # -- HTTP -------------------------------------------------------------------------------------

    def serve(self, port: int = 0, host: str = DEFAULT_ADDR, health: Health | None = None) -> MetricsServer:
        """Start the HTTP endpoint in a background thread; ``port=0`` picks a free port (see ``.port``).

        ``host`` is an IP address (``0.0.0.0`` or ``::`` for every interface). ``health`` replaces
        :meth:`health` for ``/healthz`` when given. Raises :class:`EnvironmentProblem` when the address
        cannot be bound, :class:`UsageError` when it is not an IP address.
        """
        if self._server is not None:
            raise UsageError("the metrics endpoint is already being served", "call stop() first")
        self._server = MetricsServer(self, host, port, health or self.health)
        return self._server

    @property
    def port(self) -> int | None:
        """The port being served, or None."""
        return self._server.port if self._server else None

    def stop(self) -> None:
        """Stop the HTTP endpoint if it runs."""
        if self._server is not None:
            self._server.stop()
            self._server = None


def check_addr(host: str) -> str:
    """``host`` if it is an IP address literal, else a UsageError naming the fix."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise UsageError(f"--metrics-addr {host!r} is not an IP address",
                         "give an address of this host, e.g. 127.0.0.1, the pod IP, or 0.0.0.0 for all") from None


class _Server(TcpWSGIServer):
    """waitress's server, also closing connections that stay open too long without a request to serve."""

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # closes channels idle for longer than channel_timeout
        for channel in list(self.active_channels.values()):
            if not channel.requests and now - channel.creation_time > MAX_CONNECTION_AGE:
                channel.will_close = True


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/livez`` on one address.

    prometheus-client's own ``start_http_server`` serves metrics only and runs a thread per connection,
    so its WSGI app (``make_wsgi_app``: content negotiation, gzip, ``name[]`` filters) is mounted here
    beside two health routes on waitress, whose event loop reads requests without a thread each.
    """

    def __init__(self, metrics: Metrics, host: str, port: int, health: Health):
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._health = health
        self._live = metrics.live
        host = check_addr(host)
        adj = Adjustments(host=host, port=port, threads=HTTP_THREADS, channel_timeout=IDLE_TIMEOUT,
                          cleanup_interval=1, connection_limit=MAX_CONNECTIONS,
                          max_request_header_size=MAX_REQUEST_HEADER, max_request_body_size=1024,
                          asyncore_use_poll=True, asyncore_loop_timeout=1, ident="gtp5g-op")
        self._map: dict = {}
        # waitress warns "Task queue depth is N" whenever a request waits for a thread: any client that
        # pipelines requests (every local user, on loopback) could flood the watch's log with it.
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        self._dispatcher = ThreadedTaskDispatcher()
        self._dispatcher.set_thread_count(HTTP_THREADS)
        try:
            self._httpd = _Server(self._app, self._map, dispatcher=self._dispatcher, adj=adj,
                                  sockinfo=adj.listen[0])
        except OSError as exc:
            self._dispatcher.shutdown(timeout=1)
            raise EnvironmentProblem(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
                "choose another --metrics-port (0 picks a free one) or --metrics-addr, or stop what holds the port",
            ) from exc
        self.host = host
        self.port: int = int(self._httpd.effective_port)
        self._thread = threading.Thread(target=self._httpd.run, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("serving metrics on http://%s/metrics", f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}")

    def _app(self, environ: dict, start_response: Callable):
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/livez"):
            ok, reason = (self._health if path == "/healthz" else self._live)()
            status = "200 OK" if ok else "503 Service Unavailable"
            body = (reason + "\n").encode()
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                    ("Content-Length", str(len(body)))])
            return [body]
        if path in ("/metrics", "/"):
            return self._metrics_app(environ, start_response)
        body = b"not found: try /metrics, /healthz or /livez\n"
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [body]

    def stop(self) -> None:
        """Close every connection and the listening socket; the loop ends within its 1 s poll timeout."""
        self._dispatcher.shutdown(timeout=1)
        wasyncore.close_all(self._map)
        self._thread.join(timeout=2)
