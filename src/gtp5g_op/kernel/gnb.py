"""A process named like a gNB that sends real GTP-U and IP traffic through a gtp5g device.

Inside the network namespace given with ``--netns`` it binds the gNB's N3 address (UDP 2152) and,
each round, sends to the UPF's N3 socket one uplink G-PDU (TEID ``--ul-teid``, an inner IPv4/UDP packet
from the UE) and one GTP-U Echo Request, then one downlink IP datagram to the UE address (routed into
the gtp5g device, which encapsulates it back to this gNB with TEID ``--dl-teid``). Downlink G-PDUs that
come back are counted (more than sent when gtp5g also encapsulates the kernel's ICMP answers to the
uplink's inner packets), and so are echo responses. The kernel runs gtp5g's hooks in this process's
context, so the tracer's lines name it::

    python -m gtp5g_op.kernel.gnb --netns gtp5g-op-st-123 --count 50 --json

It prints one JSON line when ready and one when done (``--json``).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import struct
import threading
import time

import click

from gtp5g_op.errors import EnvironmentProblem, UsageError, cli_errors
from gtp5g_op.kernel.workload import check_name, set_thread_name

GTPU_PORT = 2152
GTP_FLAGS = 0x30  # version 1, protocol type GTP, no optional fields
GTP_FLAGS_SEQ = 0x32  # ... with the sequence number field (Echo Request carries one)
GTP_GPDU = 0xFF
GTP_ECHO_REQUEST = 1
GTP_ECHO_RESPONSE = 2
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into the named network namespace (``ip netns`` layout)."""
    path = os.path.join(NETNS_RUN_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise EnvironmentProblem(f"network namespace {name} not found ({exc.strerror})",
                                 fix="create it first (ip netns add NAME)") from exc
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise EnvironmentProblem(f"cannot enter network namespace {name}: {os.strerror(err)}",
                                     fix="run as root")
    finally:
        os.close(fd)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes, ident: int = 0) -> bytes:
    """An IPv4/UDP packet (UDP checksum 0: optional over IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident & 0xFFFF, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def gpdu(teid: int, inner: bytes) -> bytes:
    """A GTP-U G-PDU carrying ``inner``."""
    return struct.pack("!BBHI", GTP_FLAGS, GTP_GPDU, len(inner), teid) + inner


def echo_request(seq: int) -> bytes:
    """A GTP-U Echo Request (TEID 0, sequence number, no extension headers)."""
    return struct.pack("!BBHIHBB", GTP_FLAGS_SEQ, GTP_ECHO_REQUEST, 4, 0, seq & 0xFFFF, 0, 0)


def parse_gpdu_teid(data: bytes) -> int | None:
    """The TEID of a G-PDU, None for anything else."""
    if len(data) < 8 or data[0] >> 5 != 1 or data[1] != GTP_GPDU:
        return None
    return struct.unpack_from("!I", data, 4)[0]


def run(netns: str | None, name: str, upf: str, gnb: str, ue: str, dn: str, ul_teid: int, dl_teid: int,
        count: int, rate: float, stop: threading.Event, on_ready=None) -> dict:
    """Send ``count`` rounds (0: until ``stop``) at ``rate`` rounds/s; return what was sent and received."""
    check_name(name)
    if netns:
        enter_netns(netns)
    set_thread_name(name)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    data = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((gnb, GTPU_PORT))
        sock.setblocking(False)
        if on_ready:
            on_ready({"pid": os.getpid(), "name": name, "netns": netns, "gnb": f"{gnb}:{GTPU_PORT}",
                      "upf": f"{upf}:{GTPU_PORT}"})
        sent = {"uplink_gpdu": 0, "echo_request": 0, "downlink_ip": 0}
        received = {"downlink_gpdu": 0, "echo_response": 0, "other": 0}
        errors: list[str] = []
        interval = 1.0 / rate
        next_at = time.monotonic()
        rounds = 0
        while not stop.is_set() and (count == 0 or rounds < count):
            payload = f"gtp5g-op gnb round {rounds}".encode()
            for kind, send in (
                ("uplink_gpdu", lambda: sock.sendto(gpdu(ul_teid, ipv4_udp(ue, dn, 40000, 9, payload, rounds)),
                                                    (upf, GTPU_PORT))),
                ("echo_request", lambda: sock.sendto(echo_request(rounds), (upf, GTPU_PORT))),
                ("downlink_ip", lambda: data.sendto(payload, (ue, 9))),
            ):
                try:
                    send()
                    sent[kind] += 1
                except OSError as exc:
                    if len(errors) < 5:
                        errors.append(f"{kind}: {exc.strerror}")
            rounds += 1
            _drain(sock, dl_teid, received)
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))
        deadline = time.monotonic() + 0.5  # the last downlink packets are still on their way back
        while time.monotonic() < deadline and received["downlink_gpdu"] < sent["downlink_ip"]:
            _drain(sock, dl_teid, received)
            time.sleep(0.02)
        return {"rounds": rounds, "sent": sent, "received": received, "errors": errors}
    finally:
        sock.close()
        data.close()


def _drain(sock: socket.socket, dl_teid: int, received: dict) -> None:
    while True:
        try:
            pkt = sock.recv(65535)
        except BlockingIOError:
            return
        if parse_gpdu_teid(pkt) == dl_teid:
            received["downlink_gpdu"] += 1
        elif len(pkt) >= 8 and pkt[0] >> 5 == 1 and pkt[1] == GTP_ECHO_RESPONSE:
            received["echo_response"] += 1
        else:
            received["other"] += 1


def _int(value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise UsageError(f"bad number {value!r}", fix="e.g. 0x100 or 256") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--netns", help="Network namespace to send from (/var/run/netns/NAME) [default: this one].")
@click.option("--name", default="nr-gnb", show_default=True, help="Process name (comm), at most 15 bytes.")
@click.option("--upf", default="127.0.0.1", show_default=True, help="The UPF's N3 address (gtp5g's socket).")
@click.option("--gnb", default="127.0.0.2", show_default=True, help="This gNB's N3 address.")
@click.option("--ue", default="198.18.0.2", show_default=True, help="UE address (downlink destination).")
@click.option("--dn", default="198.19.0.1", show_default=True, help="Data network address (uplink inner dst).")
@click.option("--ul-teid", default="0x100", show_default=True, help="TEID of uplink G-PDUs.")
@click.option("--dl-teid", default="0x200", show_default=True, help="TEID expected on downlink G-PDUs.")
@click.option("--count", default=20, show_default=True, type=click.IntRange(min=0),
              help="Rounds to send (0: until SIGINT/SIGTERM).")
@click.option("--rate", default=50.0, show_default=True, type=click.FloatRange(min=0.1, max=100000),
              help="Rounds per second.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: ready, then done.")
@cli_errors
def main(netns: str | None, name: str, upf: str, gnb: str, ue: str, dn: str, ul_teid: str, dl_teid: str,
         count: int, rate: float, as_json: bool) -> None:
    """Send uplink GTP-U, echo requests and downlink IP through a gtp5g device, named like a gNB.

    \b
    Examples:
      python -m gtp5g_op.kernel.gnb --netns gtp5g-op-st-123 --count 50 --json
      python -m gtp5g_op.kernel.gnb --count 0 --rate 200      # until Ctrl-C
    """
    for addr in (upf, gnb, ue, dn):
        try:
            socket.inet_aton(addr)
        except OSError:
            raise UsageError(f"bad IPv4 address {addr!r}", fix="e.g. --ue 198.18.0.2") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def ready(doc: dict) -> None:
        click.echo(json.dumps({"event": "ready", **doc}) if as_json
                   else f"{doc['name']} pid {doc['pid']}: {doc['gnb']} -> {doc['upf']}")

    result = run(netns, name, upf, gnb, ue, dn, _int(ul_teid), _int(dl_teid), count, rate, stop, ready)
    click.echo(json.dumps({"event": "done", **result}) if as_json else
               f"done: {result['rounds']} rounds, sent {result['sent']}, received {result['received']}")


if __name__ == "__main__":
    main()
