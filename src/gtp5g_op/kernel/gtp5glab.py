"""A throwaway gtp5g user plane in a private network namespace: one device, one PDU session, one gNB.

:class:`Gtp5gLab` creates the namespace ``gtp5g-op-<tag>-<pid>``, a UDP socket on the UPF's N3 address
(127.0.0.1:2152 inside the namespace), a gtp5g device bound to it, a route of the UE prefix into the
device, and a session through gtp5g's generic netlink family:

- QER 1: gate open, an MBR far above the test's rate (so ``policePacket`` runs when QoS is on, and passes);
- FAR 1: forward with GTP-U outer header creation to the gNB (127.0.0.2:2152, TEID ``dl_teid``);
- PDR 1 (downlink): UE address -> FAR 1, QER 1;
- FAR 2 + PDR 2 (uplink): local F-TEID ``ul_teid`` -> forward decapsulated, QER 1.

:meth:`Gtp5gLab.start_gnb` runs :mod:`gtp5g_op.kernel.gnb` inside the namespace. Leaving the ``with``
block (also on an exception, KeyboardInterrupt or SIGTERM turned into one) stops the gNB, deletes the
device, closes the sockets and removes the namespace; :meth:`leftovers` says what, if anything, remains.
Everything happens inside the private namespace: no address outside it is ever sent to.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gtp5g_op.errors import EnvironmentProblem, OpError
from gtp5g_op.kernel import gtp5gnl

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/var/run/netns")
QOS_PROC = Path("/proc/gtp5g/qos")


@dataclass
class LabConfig:
    tag: str = "lab"
    device: str = "gtp5g-op0"
    upf: str = "127.0.0.1"
    gnb: str = "127.0.0.2"
    ue: str = "198.18.0.2"
    ue_prefix: str = "198.18.0.0/16"
    dn: str = "198.19.0.1"  # the device's own address: source of downlink, destination of uplink
    ul_teid: int = 0x100
    dl_teid: int = 0x200
    mbr_kbps: int = 10_000_000

    @property
    def netns(self) -> str:
        return f"gtp5g-op-{self.tag}-{os.getpid()}"


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with the calling thread in network namespace ``name``; sockets made there stay there."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(NETNS_RUN_DIR / name, os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise EnvironmentProblem(f"cannot enter network namespace {name}: "
                                     f"{os.strerror(ctypes.get_errno())}", fix="run as root")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:  # cannot happen for root; never continue elsewhere
                os._exit(70)
    finally:
        os.close(target)
        os.close(home)


def qos_enabled() -> bool | None:
    """gtp5g's global QoS switch (``/proc/gtp5g/qos``); None when this gtp5g has none."""
    try:
        text = QOS_PROC.read_text()
    except OSError:
        return None
    digits = [c for c in text if c.isdigit()]
    return bool(digits) and digits[-1] != "0"


def set_qos(enabled: bool) -> None:
    QOS_PROC.write_text("1\n" if enabled else "0\n")


@dataclass
class GnbProcess:
    proc: subprocess.Popen
    pid: int
    result: dict = field(default_factory=dict)

    def wait(self, timeout: float) -> dict:
        """Wait for it to finish its rounds; returns its ``done`` report."""
        out, err = self.proc.communicate(timeout=timeout)
        for line in out.splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == "done":
                self.result = doc
        if not self.result:
            raise OpError(f"the gNB sender exited {self.proc.returncode} without a report: {err.strip()[-300:]}",
                          fix="run python -m gtp5g_op.kernel.gnb by hand to see why")
        return self.result

    def stop(self) -> None:
        _stop(self.proc)


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a sender, killed if it is still there 5 s later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Gtp5gLab:
    """The namespace, device and session described in the module docstring (a context manager)."""

    def __init__(self, config: LabConfig | None = None, session: bool = True, require_session: bool = True):
        """``session`` False: the device only. ``require_session`` False: a refused session is kept in
        ``session_error`` instead of raised (gtp5g before v0.9 refuses every rule on Linux 6.1+)."""
        self.config = config or LabConfig()
        self.session = session
        self.require_session = require_session
        self.session_error = ""
        self.rules: list[gtp5gnl.Rule] = []
        self.ifindex = 0
        self.gnbs: list[GnbProcess] = []
        self._started: list[subprocess.Popen] = []  # every sender, from its first instant: none outlives close()
        self._sock: socket.socket | None = None
        self._created = False
        self._qos_restore: bool | None = None

    # -- setup -------------------------------------------------------------------------------

    def __enter__(self) -> Gtp5gLab:
        try:
            self.create_netns()
            self.create_device()
            if self.session:
                try:
                    self.install_session()
                except gtp5gnl.Gtp5gRefused as exc:
                    if self.require_session:
                        raise
                    self.session_error = exc.one_line()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create_netns(self) -> None:
        from pyroute2 import netns

        name = self.config.netns
        if (NETNS_RUN_DIR / name).exists():  # left by a killed run with our pid: take it over
            netns.remove(name)
        netns.create(name)
        self._created = True

    def create_device(self) -> None:
        from pyroute2 import IPRoute

        cfg = self.config
        with in_netns(cfg.netns):
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with IPRoute() as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=lo, state="up")
                self._sock.bind((cfg.upf, gtp5gnl.GTPU_PORT))
                self.ifindex = gtp5gnl.create_link(ipr, cfg.device, self._sock.fileno())
                ipr.addr("add", index=self.ifindex, address=cfg.dn, prefixlen=32)
                ipr.link("set", index=self.ifindex, state="up")
                ipr.route("add", dst=cfg.ue_prefix, oif=self.ifindex)

    def install_session(self) -> None:
        cfg = self.config
        with in_netns(cfg.netns), gtp5gnl.Gtp5gGenl() as genl:
            self.rules.append(genl.add_qer(self.ifindex, 1, cfg.mbr_kbps))
            self.rules.append(genl.add_far(self.ifindex, 1, peer=cfg.gnb, teid=cfg.dl_teid))
            self.rules.append(genl.add_pdr(self.ifindex, 1, 1, ue_addr=cfg.ue, src_intf=gtp5gnl.SRC_INTF_CORE,
                                           qer_id=1))
            self.rules.append(genl.add_far(self.ifindex, 2))
            self.rules.append(genl.add_pdr(self.ifindex, 2, 2, teid=cfg.ul_teid, gtpu_addr=cfg.upf,
                                           src_intf=gtp5gnl.SRC_INTF_ACCESS, qer_id=1, outer_header_removal=0))

    def enable_qos(self) -> bool:
        """Turn gtp5g's global QoS switch on until :meth:`close` (it is off by default); False if absent."""
        state = qos_enabled()
        if state is None:
            return False
        if not state:
            set_qos(True)
            self._qos_restore = False
        return True

    def start_gnb(self, count: int = 20, rate: float = 50.0, name: str = "nr-gnb",
                  timeout: float = 30.0, binary: bool = False) -> GnbProcess:
        """Run the gNB sender in the namespace; returns once it is ready (its pid known).

        ``binary``: run it from an executable named ``name`` (:func:`~gtp5g_op.kernel.workload.target_binary`)
        so that ``watch``'s executable rules accept it as a gNB, not just the interpreter renamed.
        """
        from gtp5g_op.kernel.workload import target_binary

        cfg = self.config
        exe = (target_binary(name) if binary else None) or sys.executable
        env = None
        if exe != sys.executable:  # the copy is no venv: hand it this interpreter's import path
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        cmd = [exe, "-m", "gtp5g_op.kernel.gnb", "--json", "--netns", cfg.netns, "--name", name,
               "--upf", cfg.upf, "--gnb", cfg.gnb, "--ue", cfg.ue, "--dn", cfg.dn,
               "--ul-teid", hex(cfg.ul_teid), "--dl-teid", hex(cfg.dl_teid), "--count", str(count),
               "--rate", str(rate)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._started.append(proc)  # a SIGTERM while it starts must not orphan it (docs/tracer.md)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            line = proc.stdout.readline() if proc.stdout else ""
        finally:
            timer.cancel()
        try:
            doc = json.loads(line)
        except ValueError:
            proc.kill()
            _, err = proc.communicate()
            raise OpError(f"the gNB sender did not start within {timeout:g}s: {(line + err).strip()[-300:]}",
                          fix="run python -m gtp5g_op.kernel.gnb by hand to see why") from None
        gnb = GnbProcess(proc, int(doc["pid"]))
        self.gnbs.append(gnb)
        return gnb

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the senders, delete the device, close the socket, remove the namespace (idempotent)."""
        for proc in self._started:  # the ready ones and any interrupted before it reported ready
            _stop(proc)
        self.gnbs.clear()
        name = self.config.netns
        if self.ifindex and (NETNS_RUN_DIR / name).exists():
            # The device holds the UDP socket, which holds the namespace: delete it before the namespace.
            try:
                from pyroute2 import IPRoute

                with in_netns(name), IPRoute() as ipr:
                    ipr.link("del", index=self.ifindex)
            except Exception as exc:  # keep tearing down; leftovers() reports what stayed
                log.warning("deleting %s in %s failed: %s", self.config.device, name, exc)
            self.ifindex = 0
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._created:
            from pyroute2 import netns

            try:
                netns.remove(name)
            except OSError as exc:
                log.warning("removing network namespace %s failed: %s", name, exc)
            self._created = False
        if self._qos_restore is not None:
            try:
                set_qos(self._qos_restore)
            except OSError as exc:
                log.warning("restoring %s failed: %s", QOS_PROC, exc)
            self._qos_restore = None

    def leftovers(self) -> list[str]:
        """What this lab left behind: its namespace, or a gNB still running."""
        left = [f"gNB sender pid {proc.pid}" for proc in self._started if proc.poll() is None]
        if (NETNS_RUN_DIR / self.config.netns).exists():
            left.append(f"network namespace {self.config.netns}")
        return left
