"""verify: the BTF reader against the running kernel's BTF and hand-made blobs; ELF checks; the command."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import btf_blob, fake_loaded_gtp5g

from gtp5g_op.cli import main
from gtp5g_op.errors import EnvironmentProblem, UsageError
from gtp5g_op.kernel import verify
from gtp5g_op.kernel.verify import BtfReader

SYS_VMLINUX = Path("/sys/kernel/btf/vmlinux")


def test_reader_on_handmade_blobs():
    blob = btf_blob([("gtp5g_encap_recv", 1), ("helper", 0)])
    assert BtfReader(blob).func_linkage() == {"gtp5g_encap_recv": "global", "helper": "static"}
    split = btf_blob([("policePacket", 1)], base_str_len=5000)
    assert BtfReader(split, base_str_len=5000).func_linkage() == {"policePacket": "global"}
    assert BtfReader(split, base_str_len=4999).func_linkage() == {}  # wrong base: names do not resolve
    with pytest.raises(verify.BtfError):
        BtfReader(b"\0" * 32)


def test_reader_matches_bpftool_on_kernel_btf():
    if not SYS_VMLINUX.is_file() or shutil.which("bpftool") is None:
        pytest.skip("needs /sys/kernel/btf/vmlinux and bpftool")
    ours = BtfReader(SYS_VMLINUX.read_bytes()).func_linkage()
    dump = subprocess.run(["bpftool", "btf", "dump", "file", str(SYS_VMLINUX)], capture_output=True,
                          text=True, check=True).stdout
    theirs = {}
    for line in dump.splitlines():
        if "] FUNC '" in line:
            name = line.split("'")[1]
            theirs[name] = line.rsplit("linkage=", 1)[1]
    assert ours == theirs and len(ours) > 1000


def test_linkage_rule():
    recorded = verify.FunctionCheck("f", True, True, "static", btf_linkage_recorded=True)
    unrecorded = verify.FunctionCheck("f", True, True, "static", btf_linkage_recorded=False)
    assert not recorded.ok and unrecorded.ok
    assert not verify.FunctionCheck("f", True, True, "absent", False).ok
    assert verify.FunctionCheck("f", True, True, None).ok
    assert not verify.FunctionCheck("f", True, False, None).ok
    assert verify.FunctionCheck("f", False, False, None, present=False, required=False).ok  # skipped
    assert not verify.FunctionCheck("f", False, False, None, present=False, required=True).ok


def test_verify_ko_rejects_bad_input(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        verify.verify_ko(tmp_path / "gtp5g.ko")
    (tmp_path / "gtp5g.ko").write_text("not elf")
    with pytest.raises(UsageError, match="not an ELF file"):
        verify.verify_ko(tmp_path / "gtp5g.ko")


def test_verify_loaded_on_this_kernel():
    """Real: with CONFIG_MODULES off there is no /proc/modules; with it, gtp5g is not loaded here."""
    with pytest.raises(EnvironmentProblem, match="no loadable module support|gtp5g is not loaded"):
        verify.verify_loaded(["gtp5g_encap_recv"])


def test_verify_loaded_reads_kallsyms_and_sysfs_btf(tmp_path):
    """A /proc and /sys with gtp5g loaded: a test double, since gtp5g cannot be loaded on this machine."""
    kallsyms = ("ffffffffc0a01000 T gtp5g_encap_recv\t[gtp5g]\n"
                "ffffffffc0a02000 r __ksymtab_gtp5g_encap_recv\t[gtp5g]\n"
                "ffffffffc0a03000 T pdr_find_by_gtp1u\t[gtp5g]\n"
                "ffffffffc0a04000 t policePacket\t[gtp5g]\n"
                "ffffffff81000000 T schedule\n")
    proc, sys_root = fake_loaded_gtp5g(tmp_path, kallsyms, ["gtp5g_encap_recv", "pdr_find_by_gtp1u"])
    report = verify.verify_loaded(["gtp5g_encap_recv", "pdr_find_by_gtp1u", "policePacket"],
                                  proc=proc, sys_root=sys_root)
    got = {f.name: (f.global_symbol, f.exported, f.btf, f.ok) for f in report.functions}
    assert got == {
        "gtp5g_encap_recv": (True, True, "global", True),
        "pdr_find_by_gtp1u": (True, False, "global", False),
        "policePacket": (False, False, "absent", False),
    }
    assert report.btf_present and not report.ok


def test_cli_verify_usage_and_json(tmp_path):
    res = CliRunner().invoke(main, ["verify"])
    assert res.exit_code == 2 and "either a gtp5g.ko path or --loaded" in res.output
    res = CliRunner().invoke(main, ["verify", "--loaded", "--json"])
    assert res.exit_code == 3 and res.output.startswith("gtp5g-op: error:")


@pytest.mark.slow
def test_cli_verify_built_module(tmp_path):
    """Build the unpatched v0.8 fixture for real and check the table / JSON say not exported."""
    import glob

    from gtp5g_op.kernel import modbuild

    headers = sorted(glob.glob("/usr/src/linux-headers-*-amd64"))
    if not headers:
        pytest.skip("needs Debian's linux-headers-amd64")
    src = tmp_path / "v0.8"
    shutil.copytree(Path(__file__).resolve().parent.parent / "fixtures/gtp5g-mini/v0.8", src)
    result = modbuild.build(src, Path(headers[-1]), jobs=2)
    assert result.ok
    res = CliRunner().invoke(main, ["verify", str(result.ko), "--function", "gtp5g_encap_recv",
                                    "--function", "pdr_find_by_gtp1u", "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.output)
    assert [(f["name"], f["global"], f["exported"]) for f in doc["functions"]] == [
        ("gtp5g_encap_recv", False, False), ("pdr_find_by_gtp1u", True, False)]
    res = CliRunner().invoke(main, ["verify", str(result.ko)])
    assert "FAIL" in res.output and "no BTF" in res.output and "not all pass" in res.output


def test_loaded_module_without_btf_fails_with_both_causes(tmp_path):
    """Loaded without /sys/kernel/btf/gtp5g (built without BTF, or the kernel rejected it): a fail."""
    kallsyms = "ffffffffc0a01000 T gtp5g_encap_recv\t[gtp5g]\nffffffffc0a02000 r __ksymtab_gtp5g_encap_recv\t[gtp5g]\n"
    proc, sys_root = fake_loaded_gtp5g(tmp_path, kallsyms, ["gtp5g_encap_recv"])
    assert verify.module_btf_problem(sys_root=sys_root, proc=proc) == ""
    assert verify.verify_loaded(["gtp5g_encap_recv"], proc=proc, sys_root=sys_root).ok
    (sys_root / "kernel/btf/gtp5g").unlink()
    problem = verify.module_btf_problem(sys_root=sys_root, proc=proc)
    assert "loaded without BTF" in problem and "failed to validate module [gtp5g] BTF" in problem
    report = verify.verify_loaded(["gtp5g_encap_recv"], proc=proc, sys_root=sys_root)
    assert not report.ok and report.btf_problem == problem
    assert verify.verify_loaded(["gtp5g_encap_recv"], proc=proc, sys_root=sys_root, allow_no_btf=True).ok
    (sys_root / "module/gtp5g/holders").rmdir()
    (sys_root / "module/gtp5g").rmdir()
    assert verify.module_btf_problem(sys_root=sys_root, proc=proc).startswith("gtp5g is not loaded")
    assert "modprobe gtp5g" in verify.module_btf_problem(sys_root=sys_root, proc=proc)
    (proc / "modules").unlink()
    assert "cannot be loaded on this kernel" in verify.module_btf_problem(sys_root=sys_root, proc=proc)


def test_loader_names_the_btf_problem_not_just_not_loaded():
    """The tracer's loader words for a function fentry cannot find come from module_btf_problem."""
    from gtp5g_op.kernel.bpf_loader import explain

    text = explain(2, "fentry", "gtp5g_encap_recv", "load")
    problem = verify.module_btf_problem()
    assert (problem in text) if problem else "patch-module" in text


def test_verify_a_directory_names_the_module_inside(tmp_path):
    with pytest.raises(UsageError, match="is a directory") as exc:
        verify.verify_ko(tmp_path)
    assert str(tmp_path / "gtp5g.ko") in exc.value.fix
    res = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert res.exit_code == 2 and res.output.startswith("gtp5g-op: error:") and "does not exist" not in res.output


def test_btf_that_does_not_fit_the_base_fails():
    """Split BTF made on another base (another kernel's vmlinux): names do not resolve, the kernel rejects it."""
    split = btf_blob([("gtp5g_encap_recv", 1)], base_str_len=5000)
    base = Path("/sys/kernel/btf/vmlinux")
    if not base.is_file():
        pytest.skip("needs /sys/kernel/btf/vmlinux")
    linkage, problem = verify._btf_linkage(split, base)
    assert linkage is None and "does not fit the base BTF" in problem and "--base-btf" in problem


@pytest.mark.slow
def test_cli_verify_fails_a_module_without_btf(tmp_path):
    """A real build against Debian's headers (no vmlinux there): exports pass, BTF missing fails."""
    import glob

    from gtp5g_op.kernel import modbuild, patcher

    headers = sorted(glob.glob("/usr/src/linux-headers-*-amd64"))
    if not headers:
        pytest.skip("needs Debian's linux-headers-amd64")
    src = tmp_path / "v0.10"
    shutil.copytree(Path(__file__).resolve().parent.parent / "fixtures/gtp5g-mini/v0.10", src)
    patcher.patch(src, patcher.load_export_set())
    result = modbuild.build(src, Path(headers[-1]), jobs=2)
    assert result.ok and result.btf_skipped
    res = CliRunner().invoke(main, ["verify", str(result.ko), "--json"])
    doc = json.loads(res.output)
    assert res.exit_code == 1 and all(f["ok"] for f in doc["functions"]) and "no .BTF section" in doc["btf_problem"]
    res = CliRunner().invoke(main, ["verify", str(result.ko), "--allow-no-btf"])
    assert res.exit_code == 0 and "exports only" in res.output
    res = CliRunner().invoke(main, ["verify", str(result.ko)])
    assert res.exit_code == 1 and "--vmlinux /boot/vmlinuz-<release>" in res.output
