"""The libbpf loader on the real kernel: tracepoint programs attach and print into a private tracefs
instance; fentry programs get one plain-words verdict each without taking the others down."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import host_pids, require_root

from gtp5g_op.errors import OpError
from gtp5g_op.kernel import bpf_loader
from gtp5g_op.kernel.bpf_loader import GTP5G_BTF, BpfObject, explain, open_tracer, pick_detail
from gtp5g_op.kernel.tracer_build import KERNEL_BTF, build_tracer, clang_target_flags
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
    subprocess.run(["clang", "-g", "-O2", "-target", "bpf", *clang_target_flags(), f"-I{out}",
                    "-c", str(out / "mixed.bpf.c"), "-o", str(out / "mixed.bpf.o")], check=True)
    return {**built, "mixed": out / "mixed.bpf.o"}


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
            assert _lines_for(trace.pipe, worker.native_id, 0.5) == []
        finally:
            stop.set()
            worker.join()


def test_gtp5g_object_gets_a_verdict_per_program_without_gtp5g(objs):
    if GTP5G_BTF.exists():
        pytest.skip("gtp5g is loaded here: the programs may attach")
    bpf = open_tracer(objs["gtp5g"])
    try:
        report = bpf.report
    finally:
        bpf.close()
    assert len(report) == 12 and bpf.attached == []
    assert {r.function for r in report} == {
        "gtp5g_encap_recv", "gtp5g_handle_skb_ipv4", "ip4_find_route", "gtp5g_xmit_skb_ipv4",
        "gtp5g_push_header", "pdr_find_by_gtp1u", "policePacket"}
    for r in report:
        assert (r.loaded, r.attached, r.errno) == (False, False, errno.ESRCH), r
        assert r.error.startswith(f"{r.function} is not in gtp5g's BTF as a global function")
        assert "run gtp5g-op patch-module, rebuild, reload" in r.error
        assert f"failed to find kernel BTF type ID of '{r.function}'" in r.detail


def test_mixed_object_partial_attach_with_plain_words(objs):
    with BpfObject(objs["mixed"]) as bpf:
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
    if not fentry.attached:  # this VM: the kernel refuses fentry even to root
        assert fentry.errno == errno.EPERM
        assert "refuses fentry/fexit" in fentry.error


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


def test_missing_object_is_an_op_error(tmp_path):
    with pytest.raises(OpError, match="not found"):
        BpfObject(tmp_path / "none.bpf.o").open()


def test_not_a_bpf_object(tmp_path):
    bogus = tmp_path / "bogus.bpf.o"
    bogus.write_bytes(b"not an ELF file")
    with pytest.raises(OpError, match="libbpf cannot open"):
        BpfObject(bogus).open()


def test_explain_in_plain_words(monkeypatch):
    monkeypatch.setattr(bpf_loader.os, "geteuid", lambda: 1000)  # as a user without privileges
    assert explain(errno.EPERM, "fentry", "x", "load") == "not permitted: run as root or with CAP_BPF+CAP_PERFMON"
    monkeypatch.setattr(bpf_loader.os, "geteuid", lambda: 0)
    assert "more arguments" in explain(errno.E2BIG, "fexit", "ip4_find_route", "load")
    assert "not supported" in explain(bpf_loader.ENOTSUPP, "fexit", "f", "attach")
    assert "EINVAL" in explain(errno.EINVAL, "tp", "a/b", "load", "bad ctx")
    assert explain(errno.ENOMEM, "tp", "a/b", "attach") == "attach failed with ENOMEM (Cannot allocate memory)"


def test_pick_detail_prefers_the_verifier_verdict():
    lines = ["libbpf: prog 'p': BPF program load failed: Permission denied",
             "libbpf: prog 'p': -- BEGIN PROG LOAD LOG --", "0: (b7) r1 = 4660",
             "R1 invalid mem access 'scalar'", "processed 2 insns (limit 1000000)",
             "-- END PROG LOAD LOG --", "libbpf: prog 'p': failed to load: -13"]
    assert pick_detail("p", lines) == "R1 invalid mem access 'scalar'"
    assert pick_detail("q", ["libbpf: prog 'q': failed to find kernel BTF type ID of 'f': -3",
                             "libbpf: prog 'q': failed to load: -3"]) == \
        "prog 'q': failed to find kernel BTF type ID of 'f': -3"
