"""``gtp5g-op build tracer`` and ``gtp5g-op tracer run|selftest`` through click's CliRunner, for real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import host_pids, require_root

from gtp5g_op.cli import main
from gtp5g_op.kernel.bpf_loader import GTP5G_BTF
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
    assert doc["attached"] == 0 and len(doc["programs"]) == 12
    assert all("patch-module" in p["error"] for p in doc["programs"])
    assert result.stderr.strip() == ("gtp5g-op: error: no tracer program attached; "
                                     "fix: see why in the report above")


def test_run_holds_an_attachable_object_until_the_duration(build_dir):
    require_root("loading BPF programs")
    obj = build_dir / "selftest.bpf.o"
    result = CliRunner().invoke(main, ["tracer", "run", "--obj", str(obj), "--duration", "0.3"])
    assert result.exit_code == 0, result.output
    assert "selftest_getppid_enter" in result.stdout and "2 of 2 programs attached" in result.stderr


def test_run_one_unknown_program_is_an_error(build_dir):
    require_root("loading BPF programs")
    result = CliRunner().invoke(main, ["tracer", "run", "--build-dir", str(build_dir), "--program", "nope",
                                       "--duration", "0"])
    assert result.exit_code == 1
    assert result.stderr.startswith("gtp5g-op: error: no program named nope")


def test_build_without_clang_is_one_line_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no tools on PATH
    result = CliRunner().invoke(main, ["build", "tracer", "--out", str(tmp_path / "out")])
    assert result.exit_code == 3
    assert result.stderr == ("gtp5g-op: error: clang is not installed; "
                             "fix: install clang (apt-get install clang llvm)\n")
