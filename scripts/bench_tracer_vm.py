#!/usr/bin/env python3
"""Measure the aggregating tracer on a real gtp5g in a throwaway VM: lines per packet, exact counts, latency.

Host side (default): builds the tracer objects, boots the given kernel under qemu with virtme-ng (the
host's root file system read-only, TCG; docs/tracer.md, "Measured on a real gtp5g"), and runs this
script inside with --guest. Guest side: insmod the given gtp5g.ko, load the tracer (every program
gets its verdict: fentry, or the kprobe twin where the trampoline refuses), create a gtp5g device
bound to a UDP socket on 127.0.0.1:2152 (rtnetlink), and from threads named nr-gnb send GTP-U
G-PDUs to it:

* steady: one thread at --rate packets/s for --seconds; lines per packet and the sum of N per hook
  against the packets sent (after detach, whose flush prints what is pending), and against the packets
  sent less those the kernel dropped from its input backlog before gtp5g saw them (softnet_stat);
* new thread: a fresh thread sends one packet; the time from sendto() to its first line in the
  reader (a private tracefs instance's trace_pipe);
* --downlink: a QER/FAR/PDR session for a UE address (gtp5g's generic netlink) and IP packets routed
  into the device at --rate for --seconds (the downlink hooks), then GTP-U echo requests at --rate for
  --seconds (gtp5g answers them through ip4_find_route: its kprobe twins on Linux before 6.6).

usage: sudo scripts/bench_tracer_vm.py --ko /path/gtp5g.ko [--kernel /boot/vmlinuz-6.1.0-56-amd64]
needs: root, qemu-system-x86, busybox-static, virtme-ng (pip), a gtp5g.ko with BTF for that kernel.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORT = 2152


# --- guest ---------------------------------------------------------------------------------------
def _nla(kind: int, payload: bytes) -> bytes:
    body = struct.pack("HH", 4 + len(payload), kind) + payload
    return body + b"\0" * (-len(body) % 4)


def create_gtp5g_device(name: str, fd: int) -> None:
    """RTM_NEWLINK of kind gtp5g bound to the UDP socket ``fd`` (IFLA_GTP5G_FD1, PDR_HASHSIZE, ROLE)."""
    data = _nla(1, struct.pack("I", fd)) + _nla(2, struct.pack("I", 1024)) + _nla(3, struct.pack("I", 0))
    linkinfo = _nla(1, b"gtp5g\0") + _nla(2 | 0x8000, data)
    attrs = _nla(3, name.encode() + b"\0") + _nla(18 | 0x8000, linkinfo)
    ifi = struct.pack("BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
    flags = 0x1 | 0x4 | 0x400 | 0x200  # REQUEST, ACK, CREATE, EXCL
    msg = struct.pack("IHHII", 16 + len(ifi) + len(attrs), 16, flags, 1, 0) + ifi + attrs
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as nl:  # NETLINK_ROUTE
        nl.send(msg)
        reply = nl.recv(65536)
    err = struct.unpack_from("i", reply, 16)[0]
    if err:
        raise OSError(-err, f"creating gtp5g device {name}: {os.strerror(-err)}")
    subprocess.run(["ip", "link", "set", name, "up"], check=True)


def gpdu(teid: int, payload: bytes = b"\x45" + b"\0" * 27) -> bytes:
    """A GTP-U G-PDU: flags 0x30 (v1, PT), type 0xff, length, TEID."""
    return struct.pack("!BBHI", 0x30, 0xFF, len(payload), teid) + payload


UE_ADDR = "10.60.0.1"
# GTP-U echo request (TS 29.281 7.2.1): flags 0x32 (v1, PT, S), type 1, length 4, TEID 0, sequence 1
ECHO_REQUEST = struct.pack("!BBHIHBB", 0x32, 0x01, 4, 0, 1, 0, 0)


def install_downlink(ifindex: int) -> list[str]:
    """A downlink session through gtp5g's generic netlink (the VM lab's gtp5gnl): QER, FAR, PDR, route."""
    try:
        from gtp5g_op.kernel import gtp5gnl  # type: ignore[attr-defined]
    except ImportError:  # before the lab module lands: a copy of it on PYTHONPATH
        import gtp5gnl  # type: ignore[no-redef]
    steps = [("QER", lambda g: g.add_qer(ifindex, 1, 10_000_000)),
             ("FAR", lambda g: g.add_far(ifindex, 1, peer="127.0.0.2", teid=0x99)),
             ("PDR", lambda g: g.add_pdr(ifindex, 1, 1, ue_addr=UE_ADDR, qer_id=1, src_intf=gtp5gnl.SRC_INTF_CORE))]
    rules = []
    with gtp5gnl.Gtp5gGenl() as genl:
        for what, add in steps:
            try:
                rules.append(add(genl))
            except Exception as exc:
                raise RuntimeError(f"installing the {what} failed: {exc!r}") from exc
    qos = Path("/proc/gtp5g/qos")  # gtp5g's global QoS switch (off by default): policePacket runs when on
    if qos.exists():
        qos.write_text("1\n")
    subprocess.run(["ip", "addr", "add", "198.19.0.1/32", "dev", "gtp5gbench"], check=True)
    subprocess.run(["ip", "route", "add", f"{UE_ADDR}/32", "dev", "gtp5gbench"], check=True)
    return [f"{r.kind} {r.id}: {r.detail}" for r in rules]


def backlog_drops() -> int:
    """Packets the kernel dropped from its per-CPU input backlog (/proc/net/softnet_stat, 2nd column)."""
    with open("/proc/net/softnet_stat") as fh:
        return sum(int(line.split()[1], 16) for line in fh if line.strip())


def links() -> int:
    """BPF links in the kernel (bpftool link list): the guest runs nothing else that attaches BPF."""
    out = subprocess.run(["bpftool", "link", "list"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line[:1].isdigit())


def udp_counters() -> dict[str, int]:
    """The kernel's UDP counters (/proc/net/snmp): InDatagrams counts what an encap_rcv such as gtp5g's took."""
    with open("/proc/net/snmp") as fh:
        rows = [line.split() for line in fh if line.startswith("Udp:")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:])))


def _name_thread(name: bytes) -> None:
    ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME


def guest(args: argparse.Namespace) -> dict:
    from gtp5g_op.kernel.bpf_loader import BpfObject
    from gtp5g_op.trace.parser import parse_line
    from gtp5g_op.trace.tracefs import TraceInstance, tail

    t0 = time.monotonic()
    deps = subprocess.run(["modinfo", "-F", "depends", args.ko], capture_output=True, text=True).stdout
    for dep in filter(None, deps.strip().split(",")):
        subprocess.run(["modprobe", dep], check=True)
    subprocess.run(["insmod", args.ko], check=True)
    doc: dict = {"kernel": os.uname().release, "insmod_s": round(time.monotonic() - t0, 2)}
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    doc["module_btf"] = os.path.exists("/sys/kernel/btf/gtp5g")
    doc["dmesg_btf"] = [ln for ln in dmesg.splitlines() if "BTF" in ln and "gtp5g" in ln][-3:]
    arrivals: list[tuple[float, bytes]] = []
    with TraceInstance(f"gtp5g-op-vmbench-{os.getpid()}", buffer_kb=4096) as inst:
        stop = threading.Event()

        def read() -> None:
            rest = b""
            for chunk in tail(inst.pipe, stop):
                now = time.monotonic()
                *lines, rest = (rest + chunk).split(b"\n")
                arrivals.extend((now, ln) for ln in lines)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        t1 = time.monotonic()
        bpf = BpfObject(args.obj, interval=args.interval, kprobe_fallback=True).open()
        doc["load_attach_s"] = round(time.monotonic() - t1, 2)
        doc["programs"] = [{k: r.to_dict()[k] for k in ("name", "function", "kind", "attached", "mechanism",
                                                           "fallback", "error")} for r in bpf.report]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", PORT))
        create_gtp5g_device("gtp5gbench", sock.fileno())
        sent: dict[int, int] = {}
        marks: dict[int, float] = {}

        def sender(rate: float, seconds: float, count: int | None = None, pkt: bytes = gpdu(0x1234),
                   into: dict[int, int] = sent) -> None:
            _name_thread(b"nr-gnb")
            tid = threading.get_native_id()
            out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            n, start = 0, time.monotonic()
            marks[tid] = start
            while (count is None and time.monotonic() - start < seconds) or (count is not None and n < count):
                due = int((time.monotonic() - start) * rate) + 1 if count is None else n + 1
                while n < due and (count is None or n < count):
                    out.sendto(pkt, ("127.0.0.1", PORT))
                    n += 1
                time.sleep(0.001)
            into[tid] = n
            out.close()

        drops: dict[str, int] = {}
        d0 = backlog_drops()
        steady = threading.Thread(target=sender, args=(args.rate, args.seconds))
        steady.start()
        steady.join()
        time.sleep(0.2)
        drops["steady"] = backlog_drops() - d0
        time.sleep(0.5)
        fresh = threading.Thread(target=sender, args=(1.0, 0.0, 1))
        fresh.start()
        fresh.join()
        time.sleep(1.0)
        down: dict[int, int] = {}
        echo: dict[int, int] = {}
        if args.downlink:
            doc["downlink_rules"] = install_downlink(socket.if_nametoindex("gtp5gbench"))

            def down_sender() -> None:
                _name_thread(b"nr-gnb")
                out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                n, start = 0, time.monotonic()
                while time.monotonic() - start < args.seconds:
                    due = int((time.monotonic() - start) * args.rate) + 1
                    while n < due:
                        out.sendto(b"downlink", (UE_ADDR, 9999))
                        n += 1
                    time.sleep(0.001)
                down[threading.get_native_id()] = n
                out.close()

            d0 = backlog_drops()
            dl = threading.Thread(target=down_sender)
            dl.start()
            dl.join()
            time.sleep(0.5)
            drops["downlink"] = backlog_drops() - d0
            d0 = backlog_drops()
            # gtp5g answers an echo request through ip4_find_route (downlink IP uses another lookup)
            echo_thread = threading.Thread(target=sender, args=(args.rate, args.seconds),
                                           kwargs={"pkt": ECHO_REQUEST, "into": echo})
            echo_thread.start()
            echo_thread.join()
            time.sleep(0.5)
            drops["echo"] = backlog_drops() - d0
        t2 = time.monotonic()
        bpf.close()  # detach, then flush every pending count into the pipe
        doc["detach_flush_s"] = round(time.monotonic() - t2, 3)
        time.sleep(1.0)
        stop.set()
        reader.join(5)
        sock.close()
        doc["overruns"] = inst.overruns()
    subprocess.run(["ip", "link", "del", "gtp5gbench"], check=False)
    per: dict[int, dict] = {}
    others: dict[str, int] = {}  # events the kernel ran in another thread's context (ksoftirqd, idle)
    for when, raw in arrivals:
        ev = parse_line(raw)
        if ev is None or not ev.hook or not ev.hook.startswith(("fentry/", "fexit/")):
            continue
        if ev.subject_pid not in {**sent, **down, **echo}:
            key = f"{ev.hook} {ev.subject_comm if ev.subject_pid else '<idle>'}"
            others[key] = others.get(key, 0) + ev.count
            continue
        row = per.setdefault(ev.subject_pid, {"lines": 0, "events": {}, "first_line_at": when})
        row["lines"] += 1
        row["events"][ev.hook] = row["events"].get(ev.hook, 0) + ev.count
    tids = list(sent)
    steady_tid, fresh_tid = tids[0], tids[1]
    s = per.get(steady_tid, {"lines": 0, "events": {}})
    doc["steady"] = {
        "packets": sent[steady_tid], "seconds": args.seconds,
        "packets_per_s": round(sent[steady_tid] / args.seconds),
        "lines": s["lines"], "lines_per_packet": round(s["lines"] / max(sent[steady_tid], 1), 5),
        "events_per_hook": s["events"],
        "backlog_drops": drops["steady"],
        "counts_exact": bool(s["events"]) and all(v == sent[steady_tid] for v in s["events"].values()),
        "counts_equal_packets_minus_drops": bool(s["events"]) and all(
            v == sent[steady_tid] - drops["steady"] for v in s["events"].values()),
    }
    f = per.get(fresh_tid)
    doc["new_thread"] = {
        "packets": sent[fresh_tid],
        "events_per_hook": f["events"] if f else {},
        "first_line_ms": round((f["first_line_at"] - marks[fresh_tid]) * 1000, 1) if f else None,
    }
    for name, senders in (("downlink", down), ("echo", echo)):
        for tid, n in senders.items():
            d = per.get(tid, {"lines": 0, "events": {}})
            doc[name] = {"packets": n, "lines": d["lines"], "lines_per_packet": round(d["lines"] / max(n, 1), 5),
                         "events_per_hook": d["events"], "backlog_drops": drops[name],
                         "counts_exact": bool(d["events"]) and all(v == n for v in d["events"].values()),
                         "counts_equal_packets_minus_drops": bool(d["events"]) and all(
                             v == n - drops[name] for v in d["events"].values())}
    doc["events_in_other_threads"] = others
    doc["interval_s"] = args.interval
    table = subprocess.run([sys.executable, "-m", "gtp5g_op", "tracer", "run", "--obj", args.obj, "--duration", "0",
                            "--kprobe-fallback"],
                           capture_output=True, text=True, env=dict(os.environ, COLUMNS="80"))
    doc["tracer_run_table"] = table.stdout + table.stderr
    doc["watch_with_tracer"] = watch_phase(args)
    return doc


def watch_phase(args: argparse.Namespace) -> dict:
    """`watch --with-tracer` (validation on) while a thread sends uplink G-PDUs, stopped by SIGTERM after,
    and beside it a plain reader of another instance: the watch's event count for that thread must equal
    the sum of N over every line about it (the last ones come only from the tracer's final flush at
    detach). The sender stays alive until the watch ends, so validation can see it. Softirq work that the kernel defers to ksoftirqd is
    that thread's, not the sender's: the total over all threads is compared with the packets too."""
    from gtp5g_op.trace.parser import parse_line
    from gtp5g_op.trace.tracefs import TraceInstance, tail

    instance = f"gtp5g-op-vmwatch-{os.getpid()}"
    cmd = [sys.executable, "-m", "gtp5g_op", "watch", "--with-tracer", "--kprobe-fallback", "--json", "--no-threads",
           "--instance", instance,
           "--exe-allow", os.path.realpath(sys.executable)]  # the sender is a thread of this interpreter
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", PORT))
    create_gtp5g_device("gtp5gwatch", sock.fileno())
    seen: list[bytes] = []
    sent: dict[str, int] = {}
    done = threading.Event()
    with TraceInstance(f"gtp5g-op-vmwatch-check-{os.getpid()}") as check:
        stop = threading.Event()
        rd = threading.Thread(target=lambda: [seen.append(c) for c in tail(check.pipe, stop)], daemon=True)
        rd.start()
        watch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, XDG_CACHE_HOME=args.cache))
        try:
            deadline = time.monotonic() + 180
            while links() < 12:  # every hook attached (loading comes first; attaching takes seconds under TCG)
                if watch.poll() is not None or time.monotonic() > deadline:
                    return {"error": f"the watch did not attach the tracer: {watch.stderr.read()[-800:]}"}
                time.sleep(0.5)
            time.sleep(1.0)

            def send() -> None:
                _name_thread(b"nr-gnb")
                out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                n, start, pkt = 0, time.monotonic(), gpdu(0x4321)
                while time.monotonic() - start < args.seconds:
                    while n < int((time.monotonic() - start) * args.rate) + 1:
                        out.sendto(pkt, ("127.0.0.1", PORT))
                        n += 1
                    time.sleep(0.001)
                sent.update(tid=threading.get_native_id(), packets=n)
                out.close()
                done.wait(180)  # alive until the watch has ended: it validates live processes

            d0, u0 = backlog_drops(), udp_counters()
            sender = threading.Thread(target=send)
            sender.start()
            while "packets" not in sent:
                time.sleep(0.1)
            time.sleep(1.5)
            drops = backlog_drops() - d0
            udp = {k: v - u0.get(k, 0) for k, v in udp_counters().items() if v != u0.get(k, 0)}
            watch.terminate()  # SIGTERM: the watch detaches, the kernel prints what is pending, it reads that
            out, err = watch.communicate(timeout=180)
        finally:
            if watch.poll() is None:
                watch.kill()
            done.set()
        time.sleep(1.0)
        stop.set()
        rd.join(3)
    subprocess.run(["ip", "link", "del", "gtp5gwatch"], check=False)
    sock.close()
    if watch.returncode != 0:
        return {"error": f"watch exited {watch.returncode}: {err[-800:]}"}
    expected, total, by_hook = 0, 0, {}
    for raw in b"".join(seen).split(b"\n"):
        ev = parse_line(raw)
        if ev is None or not (ev.hook or "").startswith(("fentry/", "fexit/")):
            continue
        total += ev.count
        expected += ev.count if ev.subject_pid == sent["tid"] else 0
        key = f"{ev.hook} {ev.subject_comm}-{ev.subject_pid}"
        by_hook[key] = by_hook.get(key, 0) + ev.count
    report = json.loads(out)
    mine = [p for p in report["processes"] if p["pid"] == sent["tid"]]
    events = mine[0]["events"] if mine else 0
    return {"packets": sent["packets"], "valid": bool(mine and mine[0].get("valid")), "watch_events": events,
            "events_in_the_lines_about_the_sender": expected, "watch_equals_lines": events == expected,
            "events_all_threads": total, "backlog_drops": drops, "udp_counters_delta": udp,
            "all_threads_equal_4_per_packet_received": total == 4 * (sent["packets"] - drops),
            "attached": sum(1 for p in report.get("tracer", []) if p["attached"]),
            "watch_lines": report["stats"]["lines"], "overruns": report["stats"].get("overruns"),
            "rejected": report.get("rejected", {}), "events_by_hook_and_thread": by_hook,
            "lines": b"".join(seen).decode(errors="replace")[-3000:]}


# --- host ----------------------------------------------------------------------------------------
def host(args: argparse.Namespace) -> None:
    from gtp5g_op.kernel.tracer_build import build_tracer

    vng = shutil.which("vng") or str(Path(sys.executable).parent / "vng")
    if not os.path.exists(vng):
        sys.exit("bench: virtme-ng is not installed; fix: pip install virtme-ng")
    work = Path(tempfile.mkdtemp(prefix="gtp5g-op-vmbench-", dir=ROOT / ".cache" if (ROOT / ".cache").is_dir() else None))
    cache = work / "cache"  # the guest's watch --with-tracer finds the objects here (XDG_CACHE_HOME)
    obj = build_tracer(cache / "gtp5g-op" / "tracer", module_btf=None)["gtp5g"]
    result = work / "result.json"
    inner = [sys.executable, str(Path(__file__).resolve()), "--guest", "--ko", str(Path(args.ko).resolve()),
             "--obj", str(obj), "--result", str(result), "--rate", str(args.rate), "--seconds", str(args.seconds),
             "--interval", str(args.interval), "--cache", str(cache)] + (["--downlink"] if args.downlink else [])
    if os.environ.get("PYTHONPATH"):  # the guest's command does not inherit the host's environment
        inner = ["env", f"PYTHONPATH={os.environ['PYTHONPATH']}", *inner]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    t0 = time.monotonic()
    proc = subprocess.run([vng, "-r", args.kernel, "--force-9p", "--disable-kvm", "--memory", "2G", "--cpus", "2",
                           "--rwdir", str(work), "-e", " ".join(inner)], env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    if not result.is_file():
        sys.exit(f"bench: the guest run failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-3000:]}")
    doc = json.loads(result.read_text())
    doc["vm_wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(doc, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ko", required=True, help="gtp5g.ko built with BTF for the guest kernel")
    ap.add_argument("--kernel", default=(sorted(glob.glob("/boot/vmlinuz-6.1*")) or ["/boot/vmlinuz"])[-1])
    ap.add_argument("--rate", type=float, default=1000.0, help="packets/s of the steady thread")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=1.0, help="the tracer's line interval (s)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--downlink", action="store_true",
                    help="Also send downlink through a PDR/FAR/QER session (needs gtp5g_op.kernel.gtp5gnl)")
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--obj", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: needs root; fix: run with sudo")
    if args.guest:
        try:
            doc = guest(args)
        except BaseException as exc:  # the host reads the reason from the result file
            doc = {"error": repr(exc)}
        Path(args.result).write_text(json.dumps(doc))
    else:
        host(args)


if __name__ == "__main__":
    main()
