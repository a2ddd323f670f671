"""Build, install and reload the gtp5g kernel module.

``build`` runs gtp5g's own Makefile (``make KDIR=... KVER=...``) and keeps the whole log; ``preflight``
checks what kbuild needs first. Module BTF (what fentry attaches by) is generated only with pahole and a
``vmlinux`` in KDIR; Debian's headers have neither vmlinux nor ``resolve_btfids``, so when vmlinux is
there but resolve_btfids is not, the build passes ``RESOLVE_BTFIDS=true``: that tool only fills in
``BTF_ID()`` tables, which gtp5g does not declare (measured: without the override kbuild stops with
error 127 and deletes the .ko).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gtp5g_op.errors import EnvironmentProblem, OpError, UsageError
from gtp5g_op.kernel.patcher import STATE_DIR, is_gtp5g_tree
from gtp5g_op.model import Check

log = logging.getLogger(__name__)

SYS_VMLINUX = Path("/sys/kernel/btf/vmlinux")
MODULE = "gtp5g"
INSTALL_SUBDIR = "kernel/drivers/net"
GTP5G_KIND = "gtp5g"
_ERROR_LINE = re.compile(r"(error:|Error \d+|\*\*\*|undefined!|fatal)", re.IGNORECASE)
_BTF_SKIPPED = "Skipping BTF generation"


def kernel_release() -> str:
    return os.uname().release


def default_kdir(kver: str | None = None) -> Path:
    return Path("/lib/modules") / (kver or kernel_release()) / "build"


def kdir_release(kdir: Path) -> str | None:
    """The release modules built in KDIR are for: UTS_RELEASE (what vermagic uses), else kernel.release.

    Debian's headers hold the upstream version (6.1.192) in include/config/kernel.release but the
    package's release (6.1.0-56-amd64) in utsrelease.h, so the header wins.
    """
    uts = kdir / "include" / "generated" / "utsrelease.h"
    if uts.is_file():
        m = re.search(r'UTS_RELEASE\s+"([^"]+)"', uts.read_text())
        if m:
            return m.group(1)
    release = kdir / "include" / "config" / "kernel.release"
    if release.is_file():
        return release.read_text().strip() or None
    return None


def _kconfig(kdir: Path) -> dict[str, str]:
    config = kdir / ".config"
    if not config.is_file():
        return {}
    values = {}
    for line in config.read_text(errors="replace").splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            values[key] = value.strip('"')
    return values


def is_running_kernel_kdir(kdir: Path) -> bool:
    """True when KDIR is the build dir of the running kernel."""
    try:
        return kdir.resolve() == default_kdir().resolve() or kdir_release(kdir) == kernel_release()
    except OSError:
        return False


def compiler_for(kdir: Path) -> str:
    """The compiler kbuild will call for KDIR: from CONFIG_CC_VERSION_TEXT, else gcc."""
    text = _kconfig(kdir).get("CONFIG_CC_VERSION_TEXT", "")
    first = text.split()[0] if text else ""
    return first if re.fullmatch(r"(gcc|clang)(-\d+)?", first) else "gcc"


def preflight(kdir: Path) -> list[Check]:
    """What kbuild needs for KDIR: compiler, kbuild files, pahole and vmlinux for module BTF."""
    checks = []
    cc = compiler_for(kdir)
    checks.append(Check.passed_if("compiler", shutil.which(cc) is not None, cc,
                                  fix=f"apt-get install {cc if cc.startswith('gcc') else 'clang'}"))
    kbuild_ok = (kdir / "Makefile").is_file() and (kdir / "scripts").exists()
    checks.append(Check.passed_if("kbuild", kbuild_ok, str(kdir),
                                  fix="apt-get install linux-headers-$(uname -r) (or pass --kdir)"))
    checks.append(Check.passed_if("make", shutil.which("make") is not None, "make", fix="apt-get install make"))
    config = _kconfig(kdir)
    wants_btf = config.get("CONFIG_DEBUG_INFO_BTF_MODULES") == "y"
    pahole = shutil.which("pahole")
    checks.append(Check.passed_if(
        "pahole", pahole is not None or not wants_btf,
        pahole or ("not needed: KDIR has no CONFIG_DEBUG_INFO_BTF_MODULES" if not wants_btf else "missing"),
        fix="apt-get install dwarves (without it gtp5g.ko has no BTF and fentry cannot attach)",
        required=False,
    ))
    vmlinux = kdir / "vmlinux"
    checks.append(Check.passed_if(
        "vmlinux", vmlinux.is_file() or not wants_btf,
        str(vmlinux) if vmlinux.is_file() else "missing: module BTF will be skipped",
        fix=f"cp {SYS_VMLINUX} {kdir}/ (answer yes to the build's offer)", required=False,
    ))
    return checks


def needs_resolve_btfids_override(kdir: Path) -> bool:
    return (kdir / "vmlinux").is_file() and not (kdir / "tools/bpf/resolve_btfids/resolve_btfids").is_file()


def can_offer_vmlinux(kdir: Path) -> bool:
    """True when KDIR lacks vmlinux, belongs to the running kernel and the kernel exposes its BTF."""
    return not (kdir / "vmlinux").exists() and SYS_VMLINUX.is_file() and is_running_kernel_kdir(kdir)


def copy_vmlinux(kdir: Path) -> Path:
    """Copy the running kernel's BTF to KDIR/vmlinux so kbuild generates module BTF."""
    target = kdir / "vmlinux"
    tmp = kdir / ".vmlinux.gtp5g-op.tmp"
    try:
        shutil.copyfile(SYS_VMLINUX, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EnvironmentProblem(f"cannot copy {SYS_VMLINUX} to {target}: {exc}",
                                 fix="run as root, or copy it yourself") from exc
    return target


@dataclass
class BuildResult:
    ok: bool
    ko: Path | None
    log: Path
    seconds: float
    btf_skipped: bool
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def build(src: Path, kdir: Path | None = None, kver: str | None = None,
          on_line: Callable[[str], None] | None = None, jobs: int | None = None) -> BuildResult:
    """Run gtp5g's make against KDIR; the log goes to SRC/.gtp5g-op/build.log."""
    src = Path(src).expanduser().resolve()
    if not is_gtp5g_tree(src):
        raise UsageError(f"{src} is not a gtp5g source tree", fix="pass --src with the gtp5g checkout")
    kdir = Path(kdir or default_kdir(kver)).expanduser()
    missing = [c for c in preflight(kdir) if c.required and not c.ok]
    if missing:
        first = missing[0]
        raise EnvironmentProblem(f"cannot build: {first.name} missing ({first.detail})", fix=first.fix)
    kver = kver or kdir_release(kdir) or kernel_release()
    cmd = ["make", f"-j{jobs or os.cpu_count() or 1}", f"KDIR={kdir.resolve()}", f"KVER={kver}"]
    notes = []
    if needs_resolve_btfids_override(kdir):
        cmd.append("RESOLVE_BTFIDS=true")
        notes.append("KDIR has no resolve_btfids (Debian headers): built with RESOLVE_BTFIDS=true")
    state = src / STATE_DIR
    state.mkdir(exist_ok=True)
    (state / ".gitignore").write_text("*\n")
    log_path = state / "build.log"
    env = dict(os.environ, PWD=str(src), LC_ALL="C")
    ko = src / f"{MODULE}.ko"
    ko.unlink(missing_ok=True)
    log.info("building %s: %s", src, " ".join(cmd))
    started = time.monotonic()
    lines: list[str] = []
    with open(log_path, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        try:
            proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace")
        except OSError as exc:
            raise EnvironmentProblem(f"cannot run make: {exc}", fix="apt-get install make") from exc
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            lines.append(line.rstrip("\n"))
            if on_line:
                on_line(line.rstrip("\n"))
        code = proc.wait()
    seconds = time.monotonic() - started
    ok = code == 0 and ko.is_file()
    errors = [ln for ln in lines if _ERROR_LINE.search(ln)][-12:] if not ok else []
    btf_skipped = any(_BTF_SKIPPED in ln for ln in lines)
    return BuildResult(ok, ko if ok else None, log_path, seconds, btf_skipped, errors, notes)


@dataclass
class InstallResult:
    path: Path
    depmod: list[str]


def install(ko: Path, kver: str | None = None, root: Path = Path("/")) -> InstallResult:
    """Copy gtp5g.ko to ROOT/lib/modules/KVER/kernel/drivers/net/ (atomically) and run depmod."""
    ko = Path(ko)
    if not ko.is_file():
        raise UsageError(f"{ko} does not exist", fix="build first: gtp5g-op build module --src DIR")
    depmod = shutil.which("depmod")
    if depmod is None:
        raise EnvironmentProblem("depmod not found; nothing was installed", fix="apt-get install kmod")
    kver = kver or kernel_release()
    moddir = Path(root) / "lib" / "modules" / kver
    target_dir = moddir / INSTALL_SUBDIR
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / ko.name
        tmp = target_dir / f".{ko.name}.gtp5g-op.tmp"
        shutil.copyfile(ko, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot install to {target_dir}: {exc}", fix="run as root") from exc
    cmd = [depmod, "-a", kver] if Path(root) == Path("/") else [depmod, "-a", "-b", str(root), kver]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise OpError(f"{' '.join(cmd)} failed: {run.stderr.strip()}", fix="see depmod's message")
    return InstallResult(target, cmd)


@dataclass
class ModuleUse:
    loaded: bool
    refcount: int
    holders: list[str]


def module_use(module: str = MODULE, proc: Path = Path("/proc"), sys_root: Path = Path("/sys")) -> ModuleUse:
    """Is the module loaded, and how many users does it have (from /proc/modules)."""
    modules = proc / "modules"
    if not modules.exists():
        raise EnvironmentProblem(
            "this kernel has no loadable module support (no /proc/modules, CONFIG_MODULES off)",
            fix="reload on a host whose kernel loads modules; build and verify work here",
        )
    for line in modules.read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == module:
            refcount = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
            holders_dir = sys_root / "module" / module / "holders"
            holders = sorted(p.name for p in holders_dir.iterdir()) if holders_dir.is_dir() else []
            return ModuleUse(True, refcount, holders)
    return ModuleUse(False, 0, [])


def links_of_kind(kind: str = "gtp5g") -> list[tuple[int, str]]:
    """(index, name) of every network device of ``kind`` in this netns, via rtnetlink (pyroute2)."""
    from pyroute2 import IPRoute

    found = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            if info is not None and info.get_attr("IFLA_INFO_KIND") == kind:
                found.append((link["index"], link.get_attr("IFLA_IFNAME")))
    return found


def delete_links(kind: str) -> list[str]:
    """Delete every device of ``kind``; returns their names."""
    from pyroute2 import IPRoute

    links = links_of_kind(kind)
    with IPRoute() as ipr:
        for index, _ in links:
            ipr.link("del", index=index)
    return [name for _, name in links]


def check_reload(force: bool = False, module: str = MODULE, proc: Path = Path("/proc"),
                 sys_root: Path = Path("/sys")) -> ModuleUse:
    """Raise now if a reload cannot or must not happen (no module support; in use without ``force``)."""
    use = module_use(module, proc, sys_root)
    if use.loaded and use.refcount > 0 and not force:
        users = f" by {', '.join(use.holders)}" if use.holders else ""
        raise OpError(
            f"{module} is in use ({use.refcount} reference(s){users}): its devices (upfgtp) exist "
            "while the UPF runs; nothing was unloaded",
            fix="stop the UPF first, or pass --force to delete its gtp5g devices and unload (drops sessions)",
        )
    return use


def reload(force: bool = False, module: str = MODULE, proc: Path = Path("/proc"),
           sys_root: Path = Path("/sys"),
           run: Callable[[Sequence[str]], subprocess.CompletedProcess] | None = None) -> list[str]:
    """rmmod (when loaded) then modprobe; refuse while the module is in use unless ``force``.

    With ``force`` the module's devices (kind gtp5g, e.g. upfgtp) are deleted first so rmmod can
    succeed; ``rmmod -f`` is never used. Returns what was done. ``run`` defaults to subprocess.run
    (tests pass their own, since this machine cannot load modules).
    """
    run = run or (lambda cmd: subprocess.run(list(cmd), capture_output=True, text=True, check=False))
    use = check_reload(force, module, proc, sys_root)
    done = []
    if use.loaded and use.refcount > 0:
        for name in delete_links(GTP5G_KIND):
            done.append(f"ip link del {name}")
    steps = [["rmmod", module]] if use.loaded else []
    steps.append(["modprobe", module])
    for cmd in steps:
        result = run(cmd)
        done.append(" ".join(cmd))
        if result.returncode != 0:
            raise OpError(f"{' '.join(cmd)} failed: {(result.stderr or '').strip() or result.returncode}",
                          fix="see dmesg for the kernel's reason")
    return done
