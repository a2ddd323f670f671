"""Building the bundled tracer for real with bpftool and clang, and the line format it prints."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from gtp5g_op.errors import EnvironmentProblem, UsageError
from gtp5g_op.kernel.tracer_build import (
    KERNEL_BTF,
    build_tracer,
    clang_target_flags,
    is_stale,
    object_paths,
    source_dir,
)
from gtp5g_op.trace.parser import parse_line

FUNCTIONS = ("gtp5g_encap_recv", "gtp5g_handle_skb_ipv4", "ip4_find_route", "gtp5g_xmit_skb_ipv4",
             "gtp5g_push_header", "pdr_find_by_gtp1u", "policePacket")
FEXIT = ("gtp5g_encap_recv", "gtp5g_handle_skb_ipv4", "ip4_find_route", "pdr_find_by_gtp1u", "policePacket")
# docs/design.md: <hook>: PID=<pid>, TGID=<tgid>, CPU=<cpu>, LEN=<len>, DEV=<ifname|->[, TEID=0x<teid>][, RET=<ret>]
FORMAT_RE = re.compile(rb"(?P<hook>(fentry|fexit|selftest)/\w+): PID=%u, TGID=%u, CPU=%u, LEN=(%u|0), "
                       rb"DEV=(%s|-)(, TEID=0x%08x)?(, RET=%l?d)?")


def _have_toolchain() -> None:
    missing = [t for t in ("clang", "bpftool") if not shutil.which(t)]
    if missing or not KERNEL_BTF.is_file():
        pytest.skip(f"needs clang, bpftool and {KERNEL_BTF}: missing {missing or [str(KERNEL_BTF)]}")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    _have_toolchain()
    return build_tracer(tmp_path_factory.mktemp("tracer"))


def _sections(obj: Path) -> list[str]:
    with obj.open("rb") as f:
        return [s.name for s in ELFFile(f).iter_sections()]


def _formats(obj: Path) -> list[bytes]:
    """The bpf_printk format strings of an object (they live in .rodata)."""
    with obj.open("rb") as f:
        return [s for s in ELFFile(f).get_section_by_name(".rodata").data().split(b"\0") if s]


def test_sources_are_found_as_package_data():
    src = source_dir()
    assert {"gtp5g.bpf.c", "selftest.bpf.c", "gtp5g_types.h", "README.md"} <= {p.name for p in src.iterdir()}
    assert src.parent.name == "data", "the sources must be reachable through gtp5g_op/data/tracer"


def test_gtp5g_object_has_one_program_per_hook(built):
    sections = _sections(built["gtp5g"])
    want = [f"fentry/{fn}" for fn in FUNCTIONS] + [f"fexit/{fn}" for fn in FEXIT]
    assert sorted(s for s in sections if s.startswith(("fentry/", "fexit/"))) == sorted(want)
    assert {"license", ".BTF", ".BTF.ext"} <= set(sections)


def test_selftest_object_has_tracepoint_programs(built):
    sections = _sections(built["selftest"])
    assert {"tp/syscalls/sys_enter_getppid", "tp/syscalls/sys_exit_getppid", "license"} <= set(sections)


def test_every_printk_format_is_the_documented_line(built):
    formats = _formats(built["gtp5g"]) + _formats(built["selftest"])
    assert formats and all(FORMAT_RE.fullmatch(f) for f in formats), formats
    hooks = {FORMAT_RE.fullmatch(f)["hook"].decode() for f in formats}
    assert hooks == ({f"fentry/{fn}" for fn in FUNCTIONS} | {f"fexit/{fn}" for fn in FEXIT}
                     | {"selftest/sys_enter_getppid", "selftest/sys_exit_getppid"})
    assert any(b"TEID=0x%08x" in f and f.startswith(b"fentry/gtp5g_encap_recv") for f in formats)


def _printf(fmt: bytes, values: list) -> str:
    """Expand a bpf_printk format the way the kernel does for %u %d %ld %s %08x."""
    it = iter(values)
    return re.sub(r"%(08x|l?[uds])", lambda m: format(next(it), m[1].lstrip("l").replace("u", "d")),
                  fmt.decode())


def test_the_parser_reads_every_hook_line_as_rule_2(built):
    """Each format, filled in as bpf_printk would and framed as trace_pipe prints it, parses to its subject."""
    for fmt in _formats(built["gtp5g"]):
        n = len(re.findall(rb"%(08x|l?[uds])", fmt))
        values = [1150369, 1150348, 5, 108, "n3", 1, 0][:n]
        msg = _printf(fmt, values)
        line = f"          nr-gnb-1150369 [005] ..s21 34202.967769: bpf_trace_printk: {msg}".encode()
        ev = parse_line(line)
        assert ev is not None, line
        assert (ev.rule, ev.subject_pid, ev.subject_tgid, ev.subject_comm) == (2, 1150369, 1150348, "nr-gnb")
        assert ev.hook == fmt.split(b":")[0].decode()


def test_objects_are_fresh_after_a_build(built):
    out = built["gtp5g"].parent
    assert object_paths(out) == built
    assert not is_stale(out)
    assert (out / "vmlinux.h").stat().st_size > 100_000


def test_stale_when_an_object_is_missing(tmp_path):
    assert is_stale(tmp_path)


def test_target_flags_name_the_arch():
    flags = clang_target_flags()
    assert flags[0].startswith("-D__TARGET_ARCH_")
    if os.uname().machine == "x86_64":
        assert flags == ["-D__TARGET_ARCH_x86", "-I/usr/include/x86_64-linux-gnu"]


def test_missing_clang_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no tools at all
    with pytest.raises(EnvironmentProblem) as exc:
        build_tracer(tmp_path / "out")
    assert exc.value.fix == "install clang (apt-get install clang llvm)"


def test_missing_bpftool_says_what_to_install(tmp_path, monkeypatch):
    _have_toolchain()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "clang").symlink_to(shutil.which("clang"))
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(EnvironmentProblem) as exc:
        build_tracer(tmp_path / "out")
    assert exc.value.fix == "apt-get install bpftool"


def test_missing_kernel_btf_names_the_config(tmp_path):
    _have_toolchain()
    with pytest.raises(EnvironmentProblem) as exc:
        build_tracer(tmp_path / "out", kernel_btf=tmp_path / "no-btf")
    assert "CONFIG_DEBUG_INFO_BTF" in exc.value.fix


def test_missing_module_btf_is_a_usage_error(tmp_path):
    _have_toolchain()
    with pytest.raises(UsageError):
        build_tracer(tmp_path / "out", module_btf=tmp_path / "gtp5g")


def test_base_btf_syntax_of_the_installed_bpftool(tmp_path):
    """Debian 12's bpftool 7.1 takes the base as --base-btf (issue 10 a); the dump of split BTF works with it."""
    _have_toolchain()
    from gtp5g_op.kernel.tracer_build import base_btf_args

    args = base_btf_args(shutil.which("bpftool"), KERNEL_BTF)
    assert args == ["--base-btf", str(KERNEL_BTF)]
    import subprocess

    # A split BTF on the running kernel's BTF, dumped the way write_vmlinux_h does it.
    from conftest import btf_blob

    from gtp5g_op.kernel.verify import base_str_len

    split = tmp_path / "gtp5g"
    split.write_bytes(btf_blob([("gtp5g_encap_recv", 1)], base_str_len(KERNEL_BTF)))
    run = subprocess.run(["bpftool", *args, "btf", "dump", "file", str(split)], capture_output=True, text=True)
    assert run.returncode == 0 and "gtp5g_encap_recv" in run.stdout, run.stderr


def test_bad_kernel_btf_is_a_usage_error_naming_the_file(tmp_path):
    """issue 12: a bad --kernel-btf said "check the tracer sources" with exit 1."""
    from click.testing import CliRunner

    from gtp5g_op.cli import main

    _have_toolchain()
    junk = tmp_path / "junk"
    junk.write_text("not btf\n")
    res = CliRunner().invoke(main, ["build", "tracer", "--out", str(tmp_path / "o"), "--kernel-btf", str(junk)])
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"gtp5g-op: error: --kernel-btf {junk} is not the kernel's BTF")
    assert "tracer sources" not in res.output
    with pytest.raises(UsageError, match="is not gtp5g's BTF"):
        build_tracer(tmp_path / "o", module_btf=junk)
