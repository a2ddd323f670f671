"""gtp5g's netlink layouts against the real release headers, the gNB's packets on the wire, the lab's cleanup.

The attribute numbers are checked against include/link.h and include/genl*.h of every gtp5g release in
GTP5G_UPSTREAM (tarballs or trees; scripts/test points it at ../shared/upstream). The gNB sender runs
for real in a private network namespace with a UDP listener in the UPF's place (this kernel has no
gtp5g); the device, session and hooks run for real in the VM lab (tests/vm).
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import require_root

from gtp5g_op.cli import main
from gtp5g_op.errors import EnvironmentProblem
from gtp5g_op.kernel import gnb, gtp5gnl
from gtp5g_op.kernel.gtp5glab import NETNS_RUN_DIR, Gtp5gLab, LabConfig, in_netns


def upstream_sources() -> list[Path]:
    return [Path(p) for p in re.split(r"[:\s]+", os.environ.get("GTP5G_UPSTREAM", "")) if p and Path(p).exists()]


def _header_texts(source: Path) -> dict[str, str]:
    """include/*.h of a release tarball or tree: name -> text."""
    if source.is_dir():
        return {p.name: p.read_text() for p in (source / "include").glob("*.h")}
    out = {}
    with tarfile.open(source) as tar:
        for m in tar.getmembers():
            if m.isfile() and re.search(r"(^|/)include/[^/]+\.h$", m.name):
                out[Path(m.name).name] = tar.extractfile(m).read().decode()
    return out


def c_enums(text: str) -> dict[str, int]:
    """NAME -> value of every enumerator in ``text`` (C enums with optional ``= N``)."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)
    values: dict[str, int] = {}
    for body in re.findall(r"enum\s*\w*\s*\{(.*?)\}", text, flags=re.S):
        nxt = 0
        for item in (i.strip() for i in body.split(",")):
            if not item:
                continue
            name, _, value = (p.strip() for p in item.partition("="))
            nxt = int(value, 0) if value else nxt
            values[name] = nxt
            nxt += 1
    return values


def _ours() -> dict[str, int]:
    """Every attribute number gtp5gnl declares, under the header's name."""
    ours: dict[str, int] = {}

    def walk(cls) -> None:
        for entry in cls.nla_map:
            num, name, _ = entry
            ours[name.replace("GTP5G_QER_BR_", "GTP5G_QER_MBR_")] = num
        for attr in vars(cls).values():
            if isinstance(attr, type) and hasattr(attr, "nla_map"):
                walk(attr)

    for msg in (gtp5gnl.pdrmsg, gtp5gnl.farmsg, gtp5gnl.qermsg):
        walk(msg)
    for num, (name, _) in enumerate(gtp5gnl.gtp5g_link_data.nla_map):
        ours[name] = num
    return {k: v for k, v in ours.items() if not k.endswith("UNSPEC")}


@pytest.mark.parametrize("source", upstream_sources() or [None], ids=lambda p: p.name if p else "none")
def test_attribute_numbers_match_the_release_headers(source):
    if source is None:
        pytest.skip("GTP5G_UPSTREAM names no gtp5g tarball or tree (scripts/test sets ../shared/upstream)")
    headers = _header_texts(source)
    theirs = c_enums("\n".join(headers[h] for h in ("link.h", "genl.h", "genl_pdr.h", "genl_far.h", "genl_qer.h")))
    ours = _ours()
    missing = sorted(set(ours) - set(theirs))
    wrong = {k: (ours[k], theirs[k]) for k in ours if k in theirs and ours[k] != theirs[k]}
    assert not wrong, f"{source.name}: our number vs the header's: {wrong}"
    # The one attribute that differs between releases: v0.8.0's PDI has no source interface.
    assert missing in ([], ["GTP5G_PDI_SRC_INTF"]), f"{source.name} lacks {missing}"
    cmds = c_enums(headers["genl.h"])
    assert (cmds["GTP5G_CMD_ADD_PDR"], cmds["GTP5G_CMD_ADD_FAR"], cmds["GTP5G_CMD_ADD_QER"]) == (
        gtp5gnl.CMD_ADD_PDR, gtp5gnl.CMD_ADD_FAR, gtp5gnl.CMD_ADD_QER)


def test_c_enum_reader():
    assert c_enums("enum x { A = 3, B, /* c */ C, };\nenum { D, E = 0x10, F };") == {
        "A": 3, "B": 4, "C": 5, "D": 0, "E": 16, "F": 17}


def test_pdr_message_layout():
    """Nested PDR attributes as the kernel reads them: F-TEID host order, addresses network order."""
    msg = gtp5gnl.pdrmsg()
    msg["cmd"] = gtp5gnl.CMD_ADD_PDR
    msg["attrs"] = [("GTP5G_LINK", 7), ("GTP5G_PDR_ID", 2), ("GTP5G_PDR_PDI", {"attrs": [
        ("GTP5G_PDI_F_TEID", {"attrs": [("GTP5G_F_TEID_I_TEID", 0x100),
                                        ("GTP5G_F_TEID_GTPU_ADDR_IPV4", "127.0.0.1")]})]})]
    msg.encode()
    data = bytes(msg.data)
    assert data[16] == gtp5gnl.CMD_ADD_PDR
    assert struct.pack("<HHI", 8, 1, 7) in data  # GTP5G_LINK u32
    assert struct.pack("<HHI", 8, 1, 0x100) in data  # I_TEID u32 in host order (gtp5g applies htonl)
    assert struct.pack("<HH", 8, 2) + socket.inet_aton("127.0.0.1") in data  # be32 address


def test_link_and_genl_need_the_module():
    require_root("creating links needs CAP_NET_ADMIN")
    if gtp5gnl.module_loaded():
        pytest.skip("gtp5g is loaded here: covered by tests/vm")
    from pyroute2 import IPRoute

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock, IPRoute() as ipr, pytest.raises(EnvironmentProblem, match="no link kind gtp5g"):
        gtp5gnl.create_link(ipr, "gtp5g-op-t0", sock.fileno())
    with gtp5gnl.Gtp5gGenl() as genl, pytest.raises(EnvironmentProblem, match="generic netlink family"):
        genl.add_far(1, 1)


def test_packets():
    inner = gnb.ipv4_udp("198.18.0.2", "198.19.0.1", 40000, 9, b"hi", ident=7)
    assert gnb._checksum(inner[:20]) == 0  # a valid header sums to zero
    assert inner[9] == socket.IPPROTO_UDP and inner[12:16] == socket.inet_aton("198.18.0.2")
    pdu = gnb.gpdu(0x1234, inner)
    assert pdu[:8] == bytes([0x30, 0xFF]) + struct.pack("!HI", len(inner), 0x1234)
    assert gnb.parse_gpdu_teid(pdu) == 0x1234 and gnb.parse_gpdu_teid(gnb.echo_request(1)) is None
    echo = gnb.echo_request(5)
    assert echo[0] == 0x32 and echo[1] == 1 and struct.unpack("!H", echo[2:4])[0] == len(echo) - 8


def test_gnb_sends_real_gtpu_from_a_named_process():
    """The sender for real, in a private namespace, a plain UDP socket in the UPF's place."""
    require_root("network namespaces need root")
    lab = Gtp5gLab(LabConfig(tag="t"))
    lab.create_netns()
    try:
        with in_netns(lab.config.netns):
            upf = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            upf.bind(("127.0.0.1", gnb.GTPU_PORT))
        upf.settimeout(10)
        sender = lab.start_gnb(count=3, rate=50)
        with open(f"/proc/{sender.pid}/comm") as f:
            comm = f.read().strip()
        got = [upf.recvfrom(2048) for _ in range(6)]
        done = sender.wait(timeout=20)
        upf.close()
    finally:
        lab.close()
    assert comm == "nr-gnb"
    assert {addr for _, addr in got} == {("127.0.0.2", gnb.GTPU_PORT)}
    kinds = sorted(pkt[1] for pkt, _ in got)
    assert kinds == [1, 1, 1, 0xFF, 0xFF, 0xFF]  # echo requests, G-PDUs
    assert all(gnb.parse_gpdu_teid(pkt) == 0x100 for pkt, _ in got if pkt[1] == 0xFF)
    assert done["sent"]["uplink_gpdu"] == 3 and done["sent"]["echo_request"] == 3
    assert done["sent"]["downlink_ip"] == 0 and done["errors"]  # no gtp5g route here: said, not hidden
    assert not (NETNS_RUN_DIR / lab.config.netns).exists()


def test_lab_leaves_nothing_when_the_device_cannot_be_made():
    require_root("network namespaces need root")
    if gtp5gnl.module_loaded():
        pytest.skip("gtp5g is loaded here: covered by tests/vm")
    lab = Gtp5gLab(LabConfig(tag="t"))
    with pytest.raises(EnvironmentProblem, match="gtp5g"):
        with lab:
            pass
    assert lab.leftovers() == []


def test_gnb_cli_refuses_bad_input():
    res = subprocess.run([sys.executable, "-m", "gtp5g_op.kernel.gnb", "--ue", "nope"], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 2 and res.stderr.startswith("gtp5g-op: error: bad IPv4 address")
    res = subprocess.run([sys.executable, "-m", "gtp5g_op.kernel.gnb", "--netns", "gtp5g-op-none-0", "--json"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 3 and "network namespace gtp5g-op-none-0 not found" in res.stderr


def test_selftest_gtp5g_without_the_module_is_one_line():
    if gtp5gnl.module_loaded():
        pytest.skip("gtp5g is loaded here: covered by tests/vm")
    res = CliRunner().invoke(main, ["tracer", "selftest", "--gtp5g", "--json"])
    assert res.exit_code == 3, res.output
    assert res.output.startswith("gtp5g-op: error: ") and res.output.count("\n") == 1
    res = CliRunner().invoke(main, ["tracer", "selftest", "--enable-qos"])
    assert res.exit_code == 2 and "only apply with --gtp5g" in res.output


def test_selftest_result_json_shape():
    from gtp5g_op.kernel.selftest import GTP5G_STEPS, Gtp5gSelftestResult, HookResult, Step

    r = Gtp5gSelftestResult(steps=[Step(n, True) for n in GTP5G_STEPS],
                            hooks=[HookResult("p", "fentry/gtp5g_encap_recv", True, 3, 3)])
    doc = json.loads(json.dumps(r.to_dict()))
    assert doc["ok"] and doc["hooks"][0]["from_gnb"] == 3 and len(doc["steps"]) == len(GTP5G_STEPS)


def test_hook_counts_by_mechanism_and_sender():
    """Counters per (function, entry|exit), whatever printed them (fentry, kprobe); only the gNB's lines count
    as its own, and lines before its pid is known never do."""
    from gtp5g_op.kernel.selftest import HookResult, _HookCounts
    from gtp5g_op.trace.parser import parse_line

    def line(hook: str, pid: int) -> bytes:
        return (f"          nr-gnb-{pid}    [000] ..s21   100.000000: bpf_trace_printk: {hook}: PID={pid}, "
                f"TGID={pid}, CPU=0, LEN=100, DEV=gtp5g-op0").encode()

    counts = _HookCounts()
    counts.add(parse_line(line("fentry/gtp5g_encap_recv", 7)))  # before the gNB runs
    counts.gnb_pid = 7
    for hook, pid in [("fentry/gtp5g_encap_recv", 7), ("fexit/gtp5g_encap_recv", 7),
                      ("kprobe/ip4_find_route", 7), ("fentry/gtp5g_encap_recv", 99)]:
        counts.add(parse_line(line(hook, pid)))
    hooks = [HookResult("a", "fentry/gtp5g_encap_recv", True), HookResult("b", "fexit/gtp5g_encap_recv", True),
             HookResult("c", "fentry/ip4_find_route", True), HookResult("d", "fexit/ip4_find_route", True)]
    counts.tally(hooks)
    assert [(h.lines, h.from_gnb) for h in hooks] == [(3, 1), (1, 1), (1, 1), (0, 0)]


def test_a_sender_interrupted_while_it_starts_is_stopped_by_close():
    """SIGTERM/Ctrl-C while the gNB sender starts (before it reports ready): leftovers() names it, close()
    stops it. An orphan sender kept sending into a deleted namespace and broke the VM lab's kernel."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    lab = Gtp5gLab(LabConfig(tag="i"))  # no namespace: the sender cannot get far, but it starts
    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.02)  # well before the interpreter it starts has imported anything
    try:
        with pytest.raises(KeyboardInterrupt):
            lab.start_gnb(count=1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert lab.gnbs == []  # it never reported ready
    lab.close()
    assert lab.leftovers() == []
    import psutil

    running = [c for c in psutil.Process().children() if "gtp5g_op.kernel.gnb" in " ".join(c.cmdline())
               and c.status() != psutil.STATUS_ZOMBIE]
    assert running == []
