"""``gtp5g-op build tracer`` and ``gtp5g-op tracer run|selftest`` through click's CliRunner, for real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import host_pids, require_root

from gtp5g_op.cli import main
from gtp5g_op.kernel.bpf_loader import GTP5G_BTF, Host, module_reason
from gtp5g_op.kernel.tracer_build import KERNEL_BTF


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    missing = [t for t in ("clang", "bpftool") if not shutil.which(t)]
    if missing or not KERNEL_BTF.is_file():
        pytest.skip(f"needs clang, bpftool and kernel BTF: missing {missing or [str(KERNEL_BTF)]}")
    out = tmp_path_factory.mktemp("cli-tracer")
    result = CliRunner().invoke(main, ["build", "tracer", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    built = json.loads(result.stdout)
    assert set(built) == {"gtp5g", "selftest"} and all(Path(p).is_file() for p in built.values())
    return out


def test_help_has_examples():
    runner = CliRunner()
    for args in (["tracer", "--help"], ["tracer", "run", "--help"], ["tracer", "selftest", "--help"],
                 ["build", "tracer", "--help"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0 and "Examples:" in result.output, args


@host_pids
def test_selftest_passes(build_dir):
    require_root("the selftest loads BPF and uses tracefs")
    result = CliRunner().invoke(main, ["tracer", "selftest", "--build-dir", str(build_dir), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] and [s["name"] for s in doc["steps"]] == [
        "build", "load", "attach", "printk line in instance pipe", "parsed subject matches"]
    assert any("selftest/sys_enter_getppid: PID=" in line for line in doc["lines"])


@host_pids
def test_selftest_table(build_dir):
    require_root("the selftest loads BPF and uses tracefs")
    result = CliRunner().invoke(main, ["tracer", "selftest", "--build-dir", str(build_dir)])
    assert result.exit_code == 0, result.output
    assert "parsed subject matches" in result.stdout and "FAIL" not in result.stdout
    assert "bpf_trace_printk: selftest/sys_exit_getppid: PID=" in result.stdout


def test_run_reports_every_gtp5g_function_and_fails_when_none_attach(build_dir):
    require_root("loading BPF programs")
    if GTP5G_BTF.exists():
        pytest.skip("gtp5g is loaded here: the programs may attach")
    result = CliRunner().invoke(main, ["tracer", "run", "--build-dir", str(build_dir), "--duration", "0",
                                       "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["attached"] == 0 and len(doc["programs"]) == 12 and doc["aggregates"] and doc["interval"] == 1.0
    assert len({p["error"] for p in doc["programs"]}) == 1 and all(p["mechanism"] == "" for p in doc["programs"])
    if not Path("/proc/modules").exists():  # no module support: modprobe would be wrong advice
        assert all("no module support" in p["error"] and "modprobe" not in p["error"] for p in doc["programs"])
    assert result.stderr.strip() == ("gtp5g-op: error: no tracer program attached; "
                                     "fix: see why in the report above")


def test_run_table_fits_80_columns_and_says_a_shared_reason_once(build_dir):
    require_root("loading BPF programs")
    if GTP5G_BTF.exists():
        pytest.skip("gtp5g is loaded here: the programs may attach")
    result = CliRunner().invoke(main, ["tracer", "run", "--build-dir", str(build_dir), "--duration", "0"],
                                env={"COLUMNS": "80"})
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    reason = module_reason(Host())
    assert result.stdout.count("[1]") == 13 and "[2]" not in result.stdout  # 12 rows + the one note
    assert " ".join(result.stdout.rsplit("[1] ", 1)[1].split()) == reason
    for fn in ("fentry/gtp5g_encap_recv", "fexit/ip4_find_route", "fentry/gtp5g_handle_skb_ipv4",
               "fexit/policePacket"):
        assert any(line.startswith(f"│ {fn} ") for line in lines), fn  # hook names never cut


def test_run_holds_an_attachable_object_until_the_duration(build_dir):
    require_root("loading BPF programs")
    obj = build_dir / "selftest.bpf.o"
    result = CliRunner().invoke(main, ["tracer", "run", "--obj", str(obj), "--duration", "0.3"])
    assert result.exit_code == 0, result.output
    assert "syscalls/sys_enter_getppid" in result.stdout and "2 of 2 programs attached" in result.stderr


@host_pids
def test_run_selftest_probe_stays_attached_while_a_watch_reads(build_dir, tmp_path):
    """docs/live.md's walkthrough without a 5G core: tracer run --selftest-probe + workload + watch."""
    require_root("loading BPF programs")
    import os
    import subprocess
    import sys
    import time

    probe = subprocess.Popen([sys.executable, "-m", "gtp5g_op", "tracer", "run", "--selftest-probe",
                              "--build-dir", str(build_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 20
        line = ""
        while "programs attached" not in line and time.monotonic() < deadline:
            line = probe.stderr.readline()
            assert line or probe.poll() is None, probe.stdout.read()
        assert "2 of 2 programs attached" in line
        load = subprocess.Popen([sys.executable, "-m", "gtp5g_op.kernel.workload", "--name", "nr-gnb",
                                 "--threads", "2", "--rate", "50", "--duration", "6"], stdout=subprocess.PIPE)
        watch = subprocess.run([sys.executable, "-m", "gtp5g_op", "watch", "--json", "--duration", "3",
                                "--instance", f"gtp5g-op-test-walk-{os.getpid()}",
                                "--exe-allow", os.path.realpath(sys.executable)],  # python named nr-gnb
                               capture_output=True, text=True, timeout=60)
        load.wait(20)
        assert watch.returncode == 0, watch.stderr
        doc = json.loads(watch.stdout)
        procs = [p for p in doc["processes"] if p["comm"] == "nr-gnb" and p["tgid"] == load.pid]
        assert procs and all(p["valid"] for p in procs), doc
    finally:
        probe.terminate()
        assert probe.wait(10) == 0


def test_run_one_unknown_program_is_a_usage_error(build_dir):
    require_root("loading BPF programs")
    result = CliRunner().invoke(main, ["tracer", "run", "--build-dir", str(build_dir), "--program", "nope",
                                       "--duration", "0"])
    assert result.exit_code == 2
    assert result.stderr.startswith("gtp5g-op: error: no program named nope")
    assert len(result.stderr.splitlines()) == 1


def test_run_a_file_that_is_no_bpf_object_is_a_usage_error(build_dir, fixtures_dir):
    require_root("loading BPF programs")
    trace = next((fixtures_dir / "traces").glob("*.trace"))
    result = CliRunner().invoke(main, ["tracer", "run", "--obj", str(trace), "--duration", "0"])
    assert result.exit_code == 2
    assert result.stderr == (f"gtp5g-op: error: {trace} is not a BPF object libbpf can open (BPF object format "
                             "invalid); fix: pass the gtp5g.bpf.o that gtp5g-op build tracer made, or rebuild it\n")
    both = CliRunner().invoke(main, ["tracer", "run", "--obj", str(trace), "--selftest-probe"])
    assert both.exit_code == 2 and both.stderr.startswith("gtp5g-op: error: --selftest-probe and --obj")


def test_build_without_clang_is_one_line_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no tools on PATH
    result = CliRunner().invoke(main, ["build", "tracer", "--out", str(tmp_path / "out")])
    assert result.exit_code == 3
    assert result.stderr == ("gtp5g-op: error: clang is not installed; "
                             "fix: install clang (apt-get install clang llvm)\n")


@pytest.mark.parametrize("value", ["nan", "-1", "3601", "inf"])
def test_run_interval_must_be_a_finite_number_of_seconds(value):
    result = CliRunner().invoke(main, ["tracer", "run", "--interval", value, "--duration", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_run_flushes_idle_counts_every_interval_while_it_holds():
    """The hold loop of `tracer run` asks the loader to flush once per interval (a stand-in object that
    counts the calls: the real flush is tested against the kernel in test_bpf_loader.py)."""
    from gtp5g_op.cli.tracer import _wait_for_signal

    class Counting:
        aggregates, calls = True, 0

        def flush(self, force: bool = False) -> bool:
            self.calls += 1
            return True

    bpf = Counting()
    _wait_for_signal(0.55, bpf, every=0.1)  # type: ignore[arg-type]
    assert 4 <= bpf.calls <= 6
