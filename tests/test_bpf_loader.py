"""The libbpf loader on the real kernel: tracepoint programs attach and print into a private tracefs
instance; fentry programs get one plain-words verdict each without taking the others down."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import host_pids, require_root, wait_for

from gtp5g_op.errors import OpError, UsageError
from gtp5g_op.kernel import bpf_loader
from gtp5g_op.kernel.bpf_loader import GTP5G_BTF, BpfObject, Host, explain, module_reason, open_tracer, pick_detail
from gtp5g_op.kernel.tracer_build import KERNEL_BTF, build_tracer, clang_target_flags, source_dir
from gtp5g_op.trace.parser import parse_line
from gtp5g_op.trace.tracefs import TraceInstance, tail

# A test-owned object: one program the verifier rejects, one on a tracepoint that does not exist,
# one that attaches, and an fentry on a vmlinux function (this VM refuses fentry with EPERM).
MIXED_C = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
char LICENSE[] SEC("license") = "GPL";

SEC("tp/syscalls/sys_enter_getppid")
int rejected(void *ctx) { return *(int *)0x1234; }

SEC("tp/syscalls/sys_enter_no_such_syscall")
int no_tracepoint(void *ctx) { return 0; }

SEC("tp/syscalls/sys_enter_getppid")
int fine(void *ctx) { return 0; }

SEC("fentry/vfs_read")
int BPF_PROG(on_vfs_read) { return 0; }

SEC("kprobe/vfs_read")
int BPF_KPROBE(on_vfs_read_kprobe) { return 0; }
"""


# The tracer's own aggregation (tracer/aggregate.h) on a tracepoint, so it runs on any host: the same
# map, the same N= lines, the same flush program as the gtp5g programs. On getsid(2), which no other
# probe of the project watches: bpf_printk lines of any probe reach every instance.
AGG_C = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
#define GTP5G_OP_NHOOKS 1
#define GTP5G_OP_HOOK_LEN 32
static const char gtp5g_op_hooks[GTP5G_OP_NHOOKS][GTP5G_OP_HOOK_LEN] = {"aggtest/sys_enter_getsid"};
#include "aggregate.h"

SEC("tp/syscalls/sys_enter_getsid")
int agg_getsid(void *ctx)
{
	__u64 n = gtp5g_op_agg_take(0);
	__u64 id = bpf_get_current_pid_tgid();

	if (n)
		bpf_printk("aggtest/sys_enter_getsid: N=%llu, PID=%u, TGID=%u", n, (__u32)id, (__u32)(id >> 32));
	return 0;
}
"""


@pytest.fixture(scope="module")
def objs(tmp_path_factory) -> dict[str, Path]:
    require_root("loading BPF programs")
    missing = [t for t in ("clang", "bpftool") if not shutil.which(t)]
    if missing or not KERNEL_BTF.is_file():
        pytest.skip(f"needs clang, bpftool and kernel BTF: missing {missing or [str(KERNEL_BTF)]}")
    out = tmp_path_factory.mktemp("bpf")
    built = build_tracer(out)
    (out / "mixed.bpf.c").write_text(MIXED_C)
    (out / "agg.bpf.c").write_text(AGG_C)
    for name in ("mixed", "agg"):
        subprocess.run(["clang", "-g", "-O2", "-target", "bpf", *clang_target_flags(), f"-I{out}",
                        f"-I{source_dir()}", "-c", str(out / f"{name}.bpf.c"), "-o", str(out / f"{name}.bpf.o")],
                       check=True)
    return {**built, "mixed": out / "mixed.bpf.o", "agg": out / "agg.bpf.o"}


def _getppid_thread(stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        while not stop.is_set():
            os.getppid()
            stop.wait(0.02)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def _lines_for(pipe: Path, tid: int, seconds: float) -> list:
    """Parsed probe lines about thread ``tid`` read from ``pipe`` within ``seconds``."""
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    found, rest = [], b""
    try:
        for chunk in tail(pipe, stop):
            *lines, rest = (rest + chunk).split(b"\n")
            found += [ev for ev in map(parse_line, lines) if ev and ev.subject_pid == tid
                      and (ev.hook or "").startswith("selftest/")]
            if len(found) >= 2:
                break
    finally:
        timer.cancel()
    return found


def _probe_held_elsewhere() -> bool:
    """Whether some process still has the selftest probe loaded (bpftool lists it by name)."""
    out = subprocess.run(["bpftool", "prog", "show", "name", "selftest_getppid_enter"], capture_output=True,
                         text=True).stdout
    return bool(out.strip())


@host_pids
def test_selftest_probe_attaches_prints_and_detaches(objs):
    with TraceInstance("gtp5g-op-test-loader") as trace:
        with BpfObject(objs["selftest"]) as probe:
            assert [(r.function, r.attached) for r in probe.report] == [
                ("syscalls/sys_enter_getppid", True), ("syscalls/sys_exit_getppid", True)]
            stop = threading.Event()
            worker = _getppid_thread(stop)
            try:
                events = _lines_for(trace.pipe, worker.native_id, 5.0)
            finally:
                stop.set()
                worker.join()
        assert {ev.hook for ev in events} == {"selftest/sys_enter_getppid", "selftest/sys_exit_getppid"}
        assert all(ev.subject_tgid == os.getpid() and ev.rule == 2 for ev in events)
        # after close(), the same calls print nothing: every link was destroyed
        stop = threading.Event()
        worker = _getppid_thread(stop)
        try:
            after = _lines_for(trace.pipe, worker.native_id, 0.5)
            # bpf_printk lines reach every instance: a probe that another test (or engineer) holds
            # prints for this thread too, so lines then prove nothing about ours
            assert after == [] or _probe_held_elsewhere()
        finally:
            stop.set()
            worker.join()


def test_gtp5g_object_gets_a_verdict_per_program_without_gtp5g(objs):
    if GTP5G_BTF.exists():
        pytest.skip("gtp5g is loaded here: the programs may attach")
    bpf = open_tracer(objs["gtp5g"])
    try:
        report = bpf.report
        assert bpf.aggregates and bpf.flush(force=True)  # the flush program loads and runs anywhere
    finally:
        bpf.close()
    assert len(report) == 12 and bpf.attached == []  # one row per fentry/fexit program, twins folded in
    assert {r.function for r in report} == {
        "gtp5g_encap_recv", "gtp5g_handle_skb_ipv4", "ip4_find_route", "gtp5g_xmit_skb_ipv4",
        "gtp5g_push_header", "pdr_find_by_gtp1u", "policePacket"}
    shared = module_reason(Host())
    assert shared and len({r.error for r in report}) == 1  # one reason, said the same way for all
    for r in report:
        assert (r.loaded, r.attached, r.errno, r.mechanism) == (False, False, errno.ESRCH, ""), r
        assert r.error == shared
        assert f"failed to find kernel BTF type ID of '{r.function}'" in r.detail
    if not Path("/proc/modules").exists():  # this VM: no module support, so no modprobe advice
        assert "no module support" in shared and "modprobe" not in shared


def test_mixed_object_partial_attach_with_plain_words(objs):
    with BpfObject(objs["mixed"]) as bpf:  # kprobe_fallback is on by default
        by_name = {r.name: r for r in bpf.report}
        assert bpf.attached == ["fine"] or sorted(bpf.attached) == ["fine", "on_vfs_read"]
    rejected = by_name["rejected"]
    assert (rejected.loaded, rejected.errno) == (False, errno.EACCES)
    assert rejected.error.startswith("the BPF verifier rejected the program")
    assert "invalid mem access" in rejected.detail
    missing = by_name["no_tracepoint"]
    assert (missing.loaded, missing.attached, missing.errno) == (True, False, errno.ENOENT)
    assert missing.error == "tracepoint syscalls/sys_enter_no_such_syscall does not exist on this kernel"
    fentry = by_name["on_vfs_read"]
    assert "on_vfs_read_kprobe" not in by_name  # the twin is folded into its fentry program's row
    if not fentry.attached:  # this VM: the kernel refuses fentry even to root, and has no kprobes
        assert fentry.errno == errno.EPERM
        assert fentry.error.startswith("fentry: this kernel refuses fentry/fexit programs even to root")
        if not Host().kprobes_supported:
            assert fentry.error.endswith("; kprobe: this kernel has no kprobes (CONFIG_KPROBES is off)")
    else:
        assert fentry.mechanism in ("fentry", "kprobe")


def test_only_the_named_programs(objs):
    with BpfObject(objs["mixed"], programs=["fine"]) as bpf:
        assert [(r.name, r.attached) for r in bpf.report] == [("fine", True)]
    with pytest.raises(OpError, match="no program named nope"):
        BpfObject(objs["mixed"], programs=["nope"]).open()


def test_libbpf_log_goes_to_logging(objs, caplog):
    caplog.set_level(logging.DEBUG, logger="gtp5g_op.kernel.bpf_loader")
    with BpfObject(objs["mixed"], programs=["no_tracepoint"]):
        pass
    assert any("libbpf:" in rec.getMessage() and "no_tracepoint" in rec.getMessage() for rec in caplog.records)


def test_missing_object_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        BpfObject(tmp_path / "none.bpf.o").open()


def test_not_a_bpf_object(tmp_path):
    bogus = tmp_path / "bogus.bpf.o"
    bogus.write_bytes(b"not an ELF file")
    with pytest.raises(UsageError, match="bogus.bpf.o is not a BPF object libbpf can open"):
        BpfObject(bogus).open()


def test_explain_in_plain_words(monkeypatch):
    monkeypatch.setattr(bpf_loader.os, "geteuid", lambda: 1000)  # as a user without privileges
    assert explain(errno.EPERM, "fentry", "x", "load") == "not permitted: run as root or with CAP_BPF+CAP_PERFMON"
    monkeypatch.setattr(bpf_loader.os, "geteuid", lambda: 0)
    assert "EINVAL" in explain(errno.EINVAL, "tp", "a/b", "load", "bad ctx")
    assert explain(errno.ENOMEM, "tp", "a/b", "attach") == "attach failed with ENOMEM (Cannot allocate memory)"


# --- the reasons for gtp5g's functions, decided from a stand-in /proc and /sys -----------------
# A test double: gtp5g cannot be loaded on this machine (no module support). The BTF files are real
# BTF, parsed by libbpf itself (btf__parse_raw_split) as the loader does on a real host.
def _btf(funcs: list[tuple[str, int, int]], base_str_len: int = 0, base_types: int = 0) -> bytes:
    """BTF with one INT, then per function a FUNC_PROTO of ``nargs`` int parameters and a FUNC."""
    strings = b"\0int\0a\0"
    types = struct.pack("<III", base_str_len + 1, 1 << 24, 4) + struct.pack("<I", 32)
    int_id, next_id = base_types + 1, base_types + 2
    for name, linkage, nargs in funcs:
        off = len(strings)
        strings += name.encode() + b"\0"
        types += struct.pack("<III", 0, (13 << 24) | nargs, int_id)
        types += b"".join(struct.pack("<II", base_str_len + 5, int_id) for _ in range(nargs))
        types += struct.pack("<III", base_str_len + off, (12 << 24) | linkage, next_id)
        next_id += 2
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return header + types + strings


KALLSYMS = "".join(f"ffffffffc0a0{i:04x} t {fn}\t[gtp5g]\n" for i, fn in enumerate(
    ("gtp5g_encap_recv", "ip4_find_route", "pdr_find_by_gtp1u", "gtp5g_push_header")))


def _host(tmp_path: Path, modules: bool = True, loaded: bool = True, btf: bool = True,
          funcs: list[tuple[str, int, int]] = (), kprobes: bool = True, lockdown: str = "none") -> Host:
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    (sys_ / "kernel/btf").mkdir(parents=True)
    (sys_ / "kernel/security").mkdir(parents=True)
    proc.mkdir()
    base = _btf([("schedule", 1, 0)])
    (sys_ / "kernel/btf/vmlinux").write_bytes(base)
    (sys_ / "kernel/security/lockdown").write_text(
        " ".join(f"[{m}]" if m == lockdown else m for m in ("none", "integrity", "confidentiality")) + "\n")
    if kprobes:
        (sys_ / "bus/event_source/devices/kprobe").mkdir(parents=True)
    if modules:
        (proc / "modules").write_text("gtp5g 151552 0 - Live 0x0\n" if loaded else "udp_tunnel 32768 0 - Live 0x0\n")
        (proc / "kallsyms").write_text(KALLSYMS if loaded else "")
    if loaded:
        (sys_ / "module/gtp5g").mkdir(parents=True)
    if loaded and btf:
        (sys_ / "kernel/btf/gtp5g").write_bytes(
            _btf(list(funcs), struct.unpack_from("<I", base, 20)[0], base_types=3))
    return Host(proc=proc, sys=sys_)


ROUTE7 = [("ip4_find_route", 1, 7), ("gtp5g_encap_recv", 1, 2), ("pdr_find_by_gtp1u", 0, 5)]


def test_host_facts_from_real_btf(tmp_path):
    host = _host(tmp_path, funcs=ROUTE7)
    assert host.btf_function("ip4_find_route") == ("global", 7)
    assert host.btf_function("pdr_find_by_gtp1u") == ("static", 5)
    assert host.btf_function("policePacket") is None and not host.in_vmlinux("ip4_find_route")
    assert host.in_kallsyms("ip4_find_route") and not host.in_kallsyms("policePacket")
    assert host.kprobes_supported and host.lockdown == "none" and host.module_loaded


@pytest.mark.parametrize(("setup", "err", "kind", "function", "words"), [
    # fix (b): ENOTSUPP at attach for a 7-argument function is the argument count, not "unsupported"
    ({}, bpf_loader.ENOTSUPP, "fexit", "ip4_find_route",
     "ip4_find_route takes 7 arguments, more than this kernel's BPF trampolines take (6 on x86-64 before Linux 6.6)"),
    ({}, errno.E2BIG, "fentry", "ip4_find_route", "ip4_find_route takes 7 arguments"),
    ({}, bpf_loader.ENOTSUPP, "fentry", "gtp5g_encap_recv",
     "this kernel cannot build a BPF trampoline for gtp5g_encap_recv (ENOTSUPP)"),
    # static linkage in BTF is what pahole 1.24 writes for every module function: no reason by itself
    ({}, bpf_loader.ENOTSUPP, "fentry", "pdr_find_by_gtp1u",
     "this kernel cannot build a BPF trampoline for pdr_find_by_gtp1u (ENOTSUPP)"),
    ({}, errno.ESRCH, "fentry", "gtp5g_push_header",
     "gtp5g_push_header is not in gtp5g's BTF: run gtp5g-op patch-module"),
    ({}, errno.ESRCH, "fentry", "policePacket",
     "policePacket is not in the loaded gtp5g (absent from /proc/kallsyms): inlined by the compiler, or not in "
     "this gtp5g release (policePacket needs v0.9.0+)"),
    ({"btf": False}, errno.ESRCH, "fentry", "gtp5g_encap_recv", "gtp5g is loaded without BTF"),
    ({"loaded": False}, errno.ESRCH, "fentry", "gtp5g_encap_recv", "gtp5g is not loaded (no "),
    ({"modules": False, "loaded": False}, errno.ESRCH, "fentry", "gtp5g_encap_recv",
     "gtp5g cannot be loaded on this kernel (no module support, CONFIG_MODULES off)"),
    ({"kprobes": False}, errno.ENOENT, "kprobe", "ip4_find_route", "this kernel has no kprobes (CONFIG_KPROBES is off)"),
    ({"lockdown": "confidentiality"}, errno.EPERM, "kprobe", "ip4_find_route",
     "kernel lockdown (confidentiality) forbids this kprobe program"),
    ({}, errno.EPERM, "fentry", "gtp5g_encap_recv", "this kernel refuses fentry/fexit programs even to root (EPERM"),
    ({"btf": False}, errno.ENOENT, "kprobe", "gtp5g_encap_recv",
     "the kernel cannot put a kprobe on gtp5g_encap_recv (ENOENT)"),  # kprobes need no BTF
])
def test_the_true_reason_per_function(tmp_path, monkeypatch, setup, err, kind, function, words):
    monkeypatch.setattr(bpf_loader.os, "geteuid", lambda: 0)
    why = explain(err, kind, function, "attach", "", _host(tmp_path, funcs=ROUTE7, **setup))
    assert why.startswith(words), why
    assert "programs are not supported" not in why
    if setup.get("modules") is False:
        assert "modprobe" not in why


def test_pick_detail_prefers_the_verifier_verdict():
    lines = ["libbpf: prog 'p': BPF program load failed: Permission denied",
             "libbpf: prog 'p': -- BEGIN PROG LOAD LOG --", "0: (b7) r1 = 4660",
             "R1 invalid mem access 'scalar'", "processed 2 insns (limit 1000000)",
             "-- END PROG LOAD LOG --", "libbpf: prog 'p': failed to load: -13"]
    assert pick_detail("p", lines) == "R1 invalid mem access 'scalar'"
    assert pick_detail("q", ["libbpf: prog 'q': failed to find kernel BTF type ID of 'f': -3",
                             "libbpf: prog 'q': failed to load: -3"]) == \
        "prog 'q': failed to find kernel BTF type ID of 'f': -3"


class _Collector:
    """Reads an instance pipe in a thread; parsed lines about one thread, with their arrival time."""

    def __init__(self, pipe: Path):
        self.events: list[tuple[float, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self._thread.start()

    def _run(self, pipe: Path) -> None:
        rest = b""
        for chunk in tail(pipe, self._stop, poll_seconds=0.05):
            now = time.monotonic()
            *lines, rest = (rest + chunk).split(b"\n")
            self.events += [(now, ev) for ev in map(parse_line, lines) if ev and (ev.hook or "").startswith("aggtest/")]

    def about(self, tid: int) -> list:
        return [ev for _, ev in self.events if ev.subject_pid == tid]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _calls_in_thread(n: int, name: str = "gtp5g-op-agg", pause: float = 0.0) -> tuple[int, float]:
    """getsid(0) ``n`` times in a new thread; (its tid, when its first call was made)."""
    out: dict = {}

    def work() -> None:
        ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)
        out["tid"], out["t0"] = threading.get_native_id(), time.monotonic()
        for _ in range(n):
            os.getsid(0)
            if pause:
                time.sleep(pause)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return out["tid"], out["t0"]


@host_pids
def test_aggregation_counts_exactly_prints_a_new_thread_at_once_and_flushes_at_detach(objs):
    with TraceInstance(f"gtp5g-op-test-agg-{os.getpid()}") as trace:
        reader = _Collector(trace.pipe)
        try:
            with BpfObject(objs["agg"], interval=30.0) as bpf:  # no second line within the test
                assert bpf.aggregates and bpf.attached == ["agg_getsid"]
                tid, t0 = _calls_in_thread(5000)
                assert wait_for(lambda: reader.about(tid), 2.0) is not None, "a new thread prints at once"
                first_at = next(when for when, ev in reader.events if ev.subject_pid == tid)
                assert first_at - t0 < 1.0
                time.sleep(0.3)
                assert [ev.count for ev in reader.about(tid)] == [1]  # the rest waits in the map
            # close(): links destroyed, then the flush program printed the 4999 pending events
            assert wait_for(lambda: sum(ev.count for ev in reader.about(tid)) == 5000, 2.0) is not None
        finally:
            reader.stop()
    lines = reader.about(tid)
    assert len(lines) == 2 and lines[1].count == 4999
    flushed = lines[1]
    assert flushed.rule == 1 and flushed.subject_comm == "gtp5g-op-agg"  # the comm the kernel kept
    assert flushed.message.startswith("aggtest/sys_enter_getsid: N=4999, TGID=")


@host_pids
def test_aggregation_interval_and_periodic_flush(objs):
    with TraceInstance(f"gtp5g-op-test-agg2-{os.getpid()}") as trace:
        reader = _Collector(trace.pipe)
        try:
            with BpfObject(objs["agg"], interval=0.2) as bpf:
                tid, _ = _calls_in_thread(60, pause=0.01)  # about 0.6 s of calls: 3-5 lines, not 60
                time.sleep(0.3)
                assert bpf.flush()  # idle for an interval: its residual is printed now
                assert wait_for(lambda: sum(ev.count for ev in reader.about(tid)) == 60, 2.0) is not None
                n_lines = len(reader.about(tid))
                assert 2 <= n_lines <= 8
                assert bpf.flush(force=True)  # nothing pending: nothing printed
                time.sleep(0.2)
                assert len(reader.about(tid)) == n_lines
            with BpfObject(objs["agg"], interval=0) as bpf:  # 0: one line per event, N=1
                tid, _ = _calls_in_thread(20)
                assert wait_for(lambda: len(reader.about(tid)) == 20, 2.0) is not None
                assert {ev.count for ev in reader.about(tid)} == {1}
        finally:
            reader.stop()


def test_interval_out_of_range_is_a_usage_error(objs):
    with pytest.raises(UsageError, match="--interval must be between 0 and 3600"):
        BpfObject(objs["agg"], interval=-1)


HELPER = r"""
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, b"nr-gnb", 0, 0, 0)
sys.stdin.readline()
n = int(sys.argv[1])
for _ in range(n):
    os.getsid(0)
print(n, flush=True)
sys.stdin.readline()
"""


@host_pids
def test_watch_counts_every_event_of_an_aggregating_tracer_including_the_final_flush(objs):
    """Real kernel lines through a real watch: the first line at once (N=1), the rest flushed at detach."""
    from gtp5g_op.trace.watch import WatchOptions, run_watch

    helper = subprocess.Popen([sys.executable, "-c", HELPER, "2000"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    name = f"gtp5g-op-test-aggwatch-{os.getpid()}"
    out: dict = {}
    watcher = threading.Thread(target=lambda: out.update(
        result=run_watch(WatchOptions(instance=name, duration=5.0, threads=False,
                                      exe_allow=(os.path.realpath(sys.executable),)))))  # python named nr-gnb
    try:
        watcher.start()
        enable = Path(f"/sys/kernel/tracing/instances/{name}/events/bpf_trace/bpf_trace_printk/enable")
        assert wait_for(lambda: enable.exists() and enable.read_text().strip() == "1", 5.0) is not None
        time.sleep(0.2)  # the watch opens the pipe right after enabling the event
        with BpfObject(objs["agg"], interval=30.0):
            helper.stdin.write("go\n")
            helper.stdin.flush()
            assert helper.stdout.readline().strip() == "2000"
            time.sleep(0.3)
        watcher.join(15)
    finally:
        helper.stdin.close()
        helper.wait(5)
    report = out["result"].report
    mine = [p for p in report["processes"] if p["pid"] == helper.pid]
    assert len(mine) == 1 and mine[0]["comm"] == "nr-gnb" and mine[0]["valid"], report
    assert mine[0]["events"] == 2000


def test_without_kprobe_fallback_the_report_says_a_kprobe_could_trace_it(objs):
    """kprobe_fallback=False (--no-kprobe-fallback): the twin is not tried; the reason names the option."""
    with BpfObject(objs["mixed"], programs=["on_vfs_read"], kprobe_fallback=False) as bpf:
        (fentry,) = bpf.report
    if fentry.attached:  # a kernel that takes fentry: nothing to fall back from
        assert fentry.mechanism == "fentry"
        return
    assert fentry.mechanism == "" and not fentry.error.startswith("fentry: ")
    assert fentry.error.endswith("; a kprobe could trace it: drop --no-kprobe-fallback")
