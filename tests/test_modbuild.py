"""Real kbuild runs of the fixture trees against Debian's linux-headers, install with depmod, reload paths."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from hostile import NOBODY, as_user, open_tmp, require_root  # noqa: F401 - open_tmp is a fixture

from gtp5g_op.cli import main
from gtp5g_op.errors import EnvironmentProblem, OpError, UsageError
from gtp5g_op.kernel import modbuild, patcher, verify

MINI = Path(__file__).resolve().parent.parent / "fixtures" / "gtp5g-mini"
HEADERS = sorted(glob.glob("/usr/src/linux-headers-*-amd64"))


def headers() -> Path:
    if not HEADERS or shutil.which("make") is None:
        pytest.skip("needs Debian's linux-headers-amd64 and make (apt-get install linux-headers-amd64)")
    return Path(HEADERS[-1])


@pytest.fixture
def kdir() -> Path:
    return headers()


def copy_tree(tmp_path: Path, release: str) -> Path:
    dst = tmp_path / release
    shutil.copytree(MINI / release, dst)
    return dst


def build_ok(src: Path, kdir: Path) -> modbuild.BuildResult:
    result = modbuild.build(src, kdir, jobs=2)
    assert result.ok, "\n".join(result.errors)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("release", ["v0.8", "v0.10"])
def test_patch_build_verify_revert_cycle(tmp_path, kdir, release):
    """The CI flow: patch -> build -> exported; revert -> build -> not exported; re-patch is a no-op."""
    src = copy_tree(tmp_path, release)
    exports = patcher.load_export_set()
    assert patcher.patch(src, exports).changed
    result = build_ok(src, kdir)
    assert result.btf_skipped  # Debian's headers ship no vmlinux
    report = verify.verify_ko(result.ko)  # the bundled set; what the release lacks is skipped
    assert not report.ok and "no .BTF section" in report.btf_problem  # no BTF fails (issue 10 d)
    report = verify.verify_ko(result.ko, allow_no_btf=True)  # exports only
    assert report.ok and not report.btf_present, report.as_dict()
    skipped = [f.name for f in report.functions if f.skipped]
    assert skipped == (["policePacket"] if release == "v0.8" else [])
    names = [f.name for f in report.functions if not f.skipped]
    assert "gtp5g_encap_recv" in verify.read_symvers(src / "Module.symvers")
    assert patcher.patch(src, exports).changed == []

    patcher.revert(src)
    report = verify.verify_ko(build_ok(src, kdir).ko, names)
    assert not report.ok
    by_name = {f.name: f for f in report.functions}
    assert not any(f.exported for f in report.functions)
    assert not by_name["gtp5g_encap_recv"].global_symbol  # static again
    assert by_name["pdr_find_by_gtp1u"].global_symbol  # global, yet not exported


@pytest.mark.slow
def test_build_with_btf_in_a_copy_of_the_headers(tmp_path, kdir):
    """Module BTF: vmlinux from /sys/kernel/btf in a COPY of KDIR (never /usr/src); resolve_btfids skipped."""
    if not modbuild.SYS_VMLINUX.is_file() or shutil.which("pahole") is None:
        pytest.skip("needs /sys/kernel/btf/vmlinux and pahole (apt-get install dwarves)")
    kcopy = tmp_path / "kdir"
    shutil.copytree(kdir, kcopy, symlinks=True)
    for link in (p for p in kcopy.iterdir() if p.is_symlink()):  # relative links break in the copy
        target = (kdir / link.name).resolve()
        link.unlink()
        link.symlink_to(target)
    shutil.copyfile(modbuild.SYS_VMLINUX, kcopy / "vmlinux")
    src = copy_tree(tmp_path, "v0.10")
    patcher.patch(src, patcher.load_export_set())
    result = build_ok(src, kcopy)
    assert not result.btf_skipped and "RESOLVE_BTFIDS=true" in result.notes[0]
    report = verify.verify_ko(result.ko, base_btf=kcopy / "vmlinux")
    assert report.btf_present and report.ok, report.as_dict()
    assert {f.btf for f in report.functions} <= {"global", "static"}


@pytest.mark.slow
def test_build_failure_shows_compiler_errors(tmp_path, kdir):
    src = copy_tree(tmp_path, "v0.8")
    pdr = src / "src/pfcp/pdr.c"
    pdr.write_text(pdr.read_text().replace("return NULL;\n}", "return NULL\n}", 1))
    result = modbuild.build(src, kdir, jobs=1)
    assert not result.ok and result.ko is None
    assert any("error:" in line and "pdr.c" in line for line in result.errors)
    assert "error:" in result.log.read_text()


def test_preflight_and_missing_kdir(tmp_path, kdir):
    names = {c.name: c for c in modbuild.preflight(kdir)}
    assert names["compiler"].ok and names["kbuild"].ok and names["compiler"].detail.startswith("gcc")
    assert not names["vmlinux"].ok and not names["vmlinux"].required
    assert not modbuild.can_offer_vmlinux(kdir)  # Debian 6.1 headers are not the running kernel's
    with pytest.raises(EnvironmentProblem, match="kbuild missing"):
        modbuild.build(copy_tree(tmp_path, "v0.8"), tmp_path / "no-kdir")
    with pytest.raises(UsageError, match="not a gtp5g source tree"):
        modbuild.build(tmp_path, kdir)


def test_vmlinux_offer_and_copy(tmp_path):
    """The offer stands only for the running kernel's KDIR without vmlinux; the copy is real."""
    if not modbuild.SYS_VMLINUX.is_file():
        pytest.skip("needs /sys/kernel/btf/vmlinux")
    kdir = tmp_path / "build"
    (kdir / "include/config").mkdir(parents=True)
    (kdir / "include/config/kernel.release").write_text("0.0.0-other\n")
    assert not modbuild.can_offer_vmlinux(kdir)
    (kdir / "include/config/kernel.release").write_text(modbuild.kernel_release() + "\n")
    assert modbuild.can_offer_vmlinux(kdir)
    copied = modbuild.copy_vmlinux(kdir)
    assert copied.read_bytes() == modbuild.SYS_VMLINUX.read_bytes()
    assert not modbuild.can_offer_vmlinux(kdir)
    assert modbuild.needs_resolve_btfids_override(kdir)


@pytest.mark.slow
def test_install_copies_and_runs_depmod(tmp_path, kdir):
    if shutil.which("depmod") is None:
        pytest.skip("needs depmod (apt-get install kmod)")
    src = copy_tree(tmp_path, "v0.8")
    ko = build_ok(src, kdir).ko
    root = tmp_path / "root"
    result = modbuild.install(ko, "6.1.0-test", root=root)
    assert result.path == root / "lib/modules/6.1.0-test/kernel/drivers/net/gtp5g.ko"
    assert result.path.read_bytes() == ko.read_bytes()
    assert "kernel/drivers/net/gtp5g.ko:" in (root / "lib/modules/6.1.0-test/modules.dep").read_text()


def test_reload_on_this_kernel_says_no_module_support():
    """Real: this VM's kernel has CONFIG_MODULES off."""
    if Path("/proc/modules").exists():
        pytest.skip("this kernel loads modules; the no-support path is not reachable")
    with pytest.raises(EnvironmentProblem, match="no loadable module support"):
        modbuild.reload()


def fake_host(tmp_path: Path, refcount: int | None) -> tuple[Path, Path]:
    """A /proc and /sys with gtp5g loaded: a test double, since gtp5g cannot be loaded on this machine."""
    proc, sys_root = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir(parents=True)
    lines = "udp_tunnel 32768 1 gtp5g, Live 0x0\n"
    if refcount is not None:
        lines += f"gtp5g 151552 {refcount} - Live 0x0\n"
        (sys_root / "module/gtp5g/holders").mkdir(parents=True)
    (proc / "modules").write_text(lines)
    return proc, sys_root


def test_reload_refuses_while_in_use(tmp_path):
    proc, sys_root = fake_host(tmp_path, refcount=2)
    ran = []
    with pytest.raises(OpError, match="in use .2 reference"):
        modbuild.reload(proc=proc, sys_root=sys_root, run=lambda cmd: ran.append(cmd))
    assert ran == []


def test_reload_sequences(tmp_path):
    ok = subprocess.CompletedProcess([], 0, "", "")
    proc, sys_root = fake_host(tmp_path, refcount=0)
    ran = []
    steps = modbuild.reload(proc=proc, sys_root=sys_root, run=lambda cmd: ran.append(cmd) or ok)
    assert ran == [["rmmod", "gtp5g"], ["modprobe", "gtp5g"]] and steps == ["rmmod gtp5g", "modprobe gtp5g"]
    proc2, sys2 = fake_host(tmp_path / "b", refcount=None)
    ran.clear()
    modbuild.reload(proc=proc2, sys_root=sys2, run=lambda cmd: ran.append(cmd) or ok)
    assert ran == [["modprobe", "gtp5g"]]
    failing = subprocess.CompletedProcess([], 1, "", "modprobe: FATAL: Module gtp5g not found")
    with pytest.raises(OpError, match="Module gtp5g not found"):
        modbuild.reload(proc=proc2, sys_root=sys2, run=lambda cmd: failing)


def test_cli_reload_refuses_before_building_anything(tmp_path, kdir):
    """Real on this VM (no module support): --reload stops before make and before any install."""
    if Path("/proc/modules").exists():
        pytest.skip("this kernel loads modules; the refusal path is not reachable")
    src = copy_tree(tmp_path, "v0.8")
    res = CliRunner().invoke(main, ["build", "module", "--src", str(src), "--kdir", str(kdir), "--reload"])
    assert res.exit_code == 2 and "--reload loads the module into the running kernel" in res.output
    res = CliRunner().invoke(main, ["build", "module", "--src", str(src), "--kdir", str(kdir), "--reload",
                                    "--kver", modbuild.kernel_release()])
    assert res.exit_code == 3 and "no loadable module support" in res.output
    assert not (src / "gtp5g.ko").exists() and "built" not in res.output


@pytest.fixture
def veth_in_netns():
    """A real veth pair in a private network namespace (stands in for gtp5g devices: same scan and delete)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    from pyroute2 import IPRoute, netns

    name = f"gtp5g-op-test-{os.getpid()}"
    netns.create(name)
    try:
        with IPRoute(netns=name) as ipr:
            ipr.link("add", ifname="upfgtp", kind="veth", peer="upfpeer")
        yield name
    finally:
        netns.remove(name)


def test_devices_in_other_namespaces_block_a_reload(tmp_path, veth_in_netns):
    """Scan every namespace for devices of the kind, refuse, then --force deletes them (real rtnetlink)."""
    find = lambda: modbuild.gtp5g_devices("veth")  # noqa: E731
    found = {(d.name, d.netns) for d in find()}
    assert {("upfgtp", f"netns {veth_in_netns}"), ("upfpeer", f"netns {veth_in_netns}")} <= found
    proc, sys_root = fake_host(tmp_path, refcount=0)
    ran = []
    ok = subprocess.CompletedProcess([], 0, "", "")
    with pytest.raises(OpError, match=rf"upfgtp \(netns {veth_in_netns}\).*nothing was built") as exc:
        modbuild.reload(proc=proc, sys_root=sys_root, run=lambda cmd: ran.append(cmd) or ok, find_devices=find)
    assert ran == [] and "--force" in exc.value.fix
    mine = lambda: [d for d in find() if d.netns == f"netns {veth_in_netns}"]  # noqa: E731
    steps = modbuild.reload(force=True, proc=proc, sys_root=sys_root, run=lambda cmd: ran.append(cmd) or ok,
                            find_devices=lambda: mine()[:1])
    assert steps[0].startswith("ip link del upf") and ran == [["rmmod", "gtp5g"], ["modprobe", "gtp5g"]]
    assert mine() == []  # deleting one end of a veth pair deletes both


def test_no_devices_here():
    """Real scan of this host: no gtp5g anywhere (this kernel cannot load it)."""
    if os.geteuid() != 0:
        pytest.skip("entering other namespaces needs root")
    assert modbuild.gtp5g_devices() == []


def test_preflight_never_offers_the_running_kernels_vmlinux_for_other_headers(kdir):
    fix = {c.name: c for c in modbuild.preflight(kdir)}["vmlinux"].fix
    release = modbuild.kdir_release(kdir)
    assert release != modbuild.kernel_release()
    assert "/sys/kernel/btf" not in fix and "answer yes" not in fix and release in fix
    if (Path("/boot") / f"vmlinuz-{release}").is_file():
        assert fix.startswith(f"pass --vmlinux /boot/vmlinuz-{release}")


def test_vmlinux_from_a_kernel_image(tmp_path, kdir):
    release = modbuild.kdir_release(kdir)
    image = Path("/boot") / f"vmlinuz-{release}"
    if not image.is_file():
        pytest.skip(f"needs {image} (apt-get install linux-image-{release})")
    elf = modbuild.vmlinux_for(image, release)
    assert elf.startswith(b"\x7fELF") and f"Linux version {release} ".encode() in elf
    with pytest.raises(UsageError, match="but KDIR is for 9.9.9-other"):
        modbuild.vmlinux_for(image, "9.9.9-other")
    (tmp_path / "junk").write_bytes(b"\0" * 100)
    with pytest.raises(UsageError, match="neither a vmlinux nor a kernel image"):
        modbuild.vmlinux_for(tmp_path / "junk", release)
    copy = tmp_path / "kdir"
    shutil.copytree(kdir, copy, symlinks=True)
    assert modbuild.place_vmlinux(copy, image).read_bytes() == elf
    assert {c.name: c for c in modbuild.preflight(copy)}["vmlinux"].ok


def test_cli_copy_vmlinux_for_other_headers_points_at_the_right_kernel(tmp_path, kdir):
    src = copy_tree(tmp_path, "v0.8")
    res = CliRunner().invoke(main, ["build", "module", "--src", str(src), "--kdir", str(kdir), "--copy-vmlinux"])
    release = modbuild.kdir_release(kdir)
    assert res.exit_code == 2, res.output
    assert f"is for {release}" in res.output and "/sys/kernel/btf/vmlinux" not in res.output.split("fix:")[1]
    assert not (kdir / "vmlinux").exists() and not (src / "gtp5g.ko").exists()


@pytest.mark.slow
def test_cli_build_module(tmp_path, kdir):
    src = copy_tree(tmp_path, "v0.10")
    res = CliRunner().invoke(main, ["build", "module", "--src", str(src), "--kdir", str(kdir),
                                    "--no-copy-vmlinux", "-j", "2"])
    assert res.exit_code == 0, res.output
    assert f"built {src}/gtp5g.ko" in res.output and "no BTF" in res.output
    (src / "src/gtpu/trTCM.c").write_text("this is not C\n")
    res = CliRunner().invoke(main, ["build", "module", "--src", str(src), "--kdir", str(kdir)])
    assert res.exit_code == 1
    assert "error:" in res.output and "gtp5g-op: error: build failed" in res.output


@pytest.mark.slow
def test_cli_install_refuses_a_module_without_btf(tmp_path, kdir):
    """Real build against Debian's headers (no vmlinux): --install stops before copying anything."""
    src = copy_tree(tmp_path, "v0.10")
    target = Path("/lib/modules") / modbuild.kdir_release(kdir) / modbuild.INSTALL_SUBDIR / "gtp5g.ko"
    existed = target.exists()
    res = CliRunner().invoke(main, ["build", "module", "--src", str(src), "--kdir", str(kdir), "--install",
                                    "--no-copy-vmlinux", "-j", "2"])
    assert res.exit_code == 1, res.output
    assert "has no BTF, so the tracer cannot attach to it; nothing was installed" in res.output
    assert "--vmlinux" in res.output and "--allow-no-btf" in res.output
    assert target.exists() == existed


def _chown_tree(root: Path, uid: int) -> None:
    for path in [root, *root.rglob("*")]:
        os.lchown(path, uid, uid)


@pytest.mark.slow
def test_build_and_install_never_write_or_read_through_links_a_tree_owner_planted(open_tmp, kdir):
    """Root builds uid 65534's tree: planted links at build.log and gtp5g.ko must not reach root's files."""
    require_root()
    src = open_tmp / "tree"
    shutil.copytree(MINI / "v0.8", src)
    _chown_tree(src, NOBODY)
    victim = open_tmp / "victim"
    victim.write_text("root's file\n")
    victim.chmod(0o600)

    def plant_log_link() -> None:
        (src / patcher.STATE_DIR).mkdir()
        (src / patcher.STATE_DIR / "build.log").symlink_to(victim)

    as_user(plant_log_link)
    ko = build_ok(src, kdir).ko
    assert victim.read_text() == "root's file\n" and (victim.stat().st_mode & 0o777) == 0o600
    assert not (src / patcher.STATE_DIR / "build.log").is_symlink()

    def swap_module_for_a_link() -> None:
        ko.unlink()
        ko.symlink_to(victim)

    as_user(swap_module_for_a_link)
    root = open_tmp / "root"
    with pytest.raises(UsageError, match="it is a symlink"):
        modbuild.install(ko, "6.1.0-test", root=root)
    assert not (root / "lib/modules/6.1.0-test/kernel/drivers/net/gtp5g.ko").exists()

    def swap_state_dir_for_a_link() -> None:
        shutil.rmtree(src / patcher.STATE_DIR)
        (src / patcher.STATE_DIR).symlink_to(open_tmp)

    as_user(swap_state_dir_for_a_link)
    with pytest.raises(UsageError, match="is a symlink or not a directory"):
        modbuild.build(src, kdir, jobs=2)
    assert not (open_tmp / "build.log").exists()
