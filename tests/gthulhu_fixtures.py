"""The Gthulhu test server as a real subprocess on 127.0.0.1, for any test that talks to the API.

Load the module as a plugin (``pytest_plugins = ["gthulhu_fixtures"]`` in a test module) and use
its fixtures::

    def test_x(gthulhu_server):
        gthulhu_server.url, gthulhu_server.public_key        # where and with which key
        gthulhu_server.control(fault="500", count=3)        # switch a fault, returns the state
        gthulhu_server.state()["strategies"]                # the raw posted set
        gthulhu_server.restart()                            # same key, same port, default strategies

    def test_y(gthulhu_start):
        server = gthulhu_start("--token-lifetime", "2")   # stopped after the test

    def test_z(manager_server):                            # a v1.3 Manager (user MANAGER_USER) with its
        manager_server.policies(), manager_server.dm_url    # node's Decision Maker on a second port

``start_server(workdir, *extra_args)`` starts one outside pytest; stop it with ``.stop()``. Ownership files of code under test should go to ``tmp_path`` (``state_dir``), not
``/run/gtp5g-op``.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests


MANAGER_USER, MANAGER_PASSWORD = "gtp5g-op", "s3cret-Pa55"


@dataclass
class TestServer:
    """A running ``python -m gtp5g_op.gthulhu.testserver`` process."""

    __test__ = False  # not a pytest test class

    workdir: Path
    args: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen | None = None
    scheme: str = "http"
    dm_port: int | None = None  # the Decision Maker's port (manager mode with --dm-port)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def dm_url(self) -> str:
        assert self.dm_port is not None, "start the server with --dm-port"
        return f"{self.scheme}://127.0.0.1:{self.dm_port}"

    @property
    def public_key(self) -> Path:
        return self.workdir / "gthulhu.pub"

    @property
    def private_key(self) -> Path:
        return self.workdir / "gthulhu.key"

    @property
    def log_path(self) -> Path:
        return self.workdir / "testserver.log"

    def start(self, timeout: float = 15.0) -> TestServer:
        """Start on ``port`` (a free one the first time) with the key in ``workdir``; wait until it listens."""
        args = list(self.args)
        if self.dm_port is not None and "--dm-port" in args:  # a restart keeps the Decision Maker's port
            args[args.index("--dm-port") + 1] = str(self.dm_port)
        cmd = [
            sys.executable, "-m", "gtp5g_op.gthulhu.testserver",
            "--port", str(self.port),
            "--private-key", str(self.private_key),
            "--public-key-out", str(self.public_key),
            *args,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        url = self._line(deadline).split()[-1]
        self.scheme, self.port = url.split(":", 1)[0], int(url.rsplit(":", 1)[1])
        if "--dm-port" in args:
            self.dm_port = int(self._line(deadline).rsplit(":", 1)[1])
        return self

    def _line(self, deadline: float) -> str:
        line = b""
        assert self.proc is not None and self.proc.stdout is not None
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"test server did not start: {self.log_path.read_text()[-2000:]}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line += os.read(self.proc.stdout.fileno(), 1)
        return line.decode()

    def stop(self) -> None:
        """Terminate the process (connections are refused from now on)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start again with the same key and port."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def control(self, **changes: Any) -> dict:
        """POST /_control with ``changes`` (fault, count, slow_seconds, token_lifetime, strategies, pods ...)."""
        resp = requests.post(self.url + "/_control", json=changes, timeout=5, verify=False)
        resp.raise_for_status()
        return resp.json()

    def state(self) -> dict:
        """GET /_control: fault, raw posted strategies, pods, request counters."""
        resp = requests.get(self.url + "/_control", timeout=5, verify=False)
        resp.raise_for_status()
        return resp.json()

    def pids(self) -> set[int]:
        """PIDs of the raw posted PID strategies."""
        return {s["pid"] for s in self.state()["strategies"] if "pid" in s and not s.get("selectors")}

    def policies(self, creator: str | None = None) -> list[dict]:
        """Manager mode: the stored node policies (of ``creator`` only, when given)."""
        return [p for p in self.state()["policies"] if creator is None or p["creator"] == creator]


def start_server(workdir: Path, *args: str) -> TestServer:
    """Start a test server keeping its key and log in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    return TestServer(workdir=workdir, args=list(args)).start()


@pytest.fixture
def gthulhu_server(tmp_path: Path) -> Iterator[TestServer]:
    """A test server with default settings for the duration of one test."""
    server = start_server(tmp_path / "gthulhu")
    try:
        yield server
    finally:
        server.stop()


def manager_args(*extra: str) -> list[str]:
    """Arguments of a Manager-mode test server with the MANAGER_USER, a reader and another user."""
    return ["--mode", "manager", "--user", f"{MANAGER_USER}:{MANAGER_PASSWORD}", "--user", "viewer:viewer-pw:reader",
            "--user", "alice:alice-pw", "--dm-port", "0", *extra]


@pytest.fixture
def manager_server(tmp_path: Path) -> Iterator[TestServer]:
    """A v1.3 Manager test server (users gtp5g-op, viewer, alice) with its node's Decision Maker."""
    server = start_server(tmp_path / "manager", *manager_args())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gthulhu_start(tmp_path: Path) -> Iterator[Callable[..., TestServer]]:
    """A function that starts test servers with extra command-line arguments; all stop after the test."""
    servers: list[TestServer] = []

    def start(*args: str) -> TestServer:
        servers.append(start_server(tmp_path / f"gthulhu-{len(servers)}", *args))
        return servers[-1]

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
