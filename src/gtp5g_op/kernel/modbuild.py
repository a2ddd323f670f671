"""Build, install and reload the gtp5g kernel module.

``build`` runs gtp5g's own Makefile (``make KDIR=... KVER=...``) and keeps the whole log; ``preflight``
checks what kbuild needs first. Module BTF (what fentry attaches by) is generated only with pahole and a
``vmlinux`` in KDIR; Debian's headers have neither vmlinux nor ``resolve_btfids``, so when vmlinux is
there but resolve_btfids is not, the build passes ``RESOLVE_BTFIDS=true``: that tool only fills in
``BTF_ID()`` tables, which gtp5g does not declare (measured: without the override kbuild stops with
error 127 and deletes the .ko).
"""

from __future__ import annotations

import errno
import logging
import lzma
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gtp5g_op.errors import EnvironmentProblem, OpError, UsageError
from gtp5g_op.kernel.patcher import STATE_DIR, is_gtp5g_tree, real_dir, write_new_temp
from gtp5g_op.model import Check

log = logging.getLogger(__name__)

SYS_VMLINUX = Path("/sys/kernel/btf/vmlinux")
BOOT = Path("/boot")
XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"
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
        fix=vmlinux_fix(kdir), required=False,
    ))
    return checks


def vmlinux_fix(kdir: Path) -> str:
    """How to get the vmlinux of KDIR's own kernel into KDIR (never another kernel's)."""
    if SYS_VMLINUX.is_file() and is_running_kernel_kdir(kdir):
        return f"pass --copy-vmlinux (copies {SYS_VMLINUX} of the running kernel into KDIR)"
    release = kdir_release(kdir) or "<KDIR's release>"
    image = BOOT / f"vmlinuz-{release}"
    if image.is_file():
        return f"pass --vmlinux {image} (takes kernel {release}'s vmlinux out of its image)"
    return (f"pass --vmlinux with kernel {release}'s vmlinux or image (/boot/vmlinuz-{release} on a host "
            f"with linux-image-{release})")


def _vmlinux_elf(data: bytes) -> bytes | None:
    """The vmlinux ELF in ``data``: itself, or the xz-compressed one inside a bzImage."""
    if data.startswith(ELF_MAGIC):
        return data
    pos = data.find(XZ_MAGIC)
    while pos >= 0:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[pos:], max_length=1 << 30)
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(ELF_MAGIC):
            return elf
        pos = data.find(XZ_MAGIC, pos + 1)
    return None


def vmlinux_for(source: Path, release: str | None) -> bytes:
    """A vmlinux with .BTF from ``source`` (a vmlinux, or a kernel image holding an xz vmlinux), checked
    to be kernel ``release``'s by its version banner."""
    try:
        data = Path(source).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror}", fix="pass a vmlinux or /boot/vmlinuz-* file")
    elf = _vmlinux_elf(data)
    if elf is None:
        raise UsageError(f"{source} is neither a vmlinux nor a kernel image with an xz-compressed vmlinux",
                         fix="pass the kernel's vmlinux (debug package) or its /boot/vmlinuz-* image")
    if b".BTF\0" not in elf:
        raise UsageError(f"the vmlinux in {source} has no .BTF section: kbuild cannot make module BTF from it",
                         fix="use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    if release and f"Linux version {release} ".encode() not in elf:
        m = re.search(rb"Linux version (\S+) ", elf)
        found = m.group(1).decode(errors="replace") if m else "unknown"
        raise UsageError(f"{source} is kernel {found}, but KDIR is for {release}: module BTF built on it "
                         "would be rejected at load", fix=vmlinux_fix_text(release))
    return elf


def vmlinux_fix_text(release: str) -> str:
    image = BOOT / f"vmlinuz-{release}"
    return f"pass --vmlinux {image}" if image.is_file() else f"pass kernel {release}'s vmlinux or image"


def place_vmlinux(kdir: Path, source: Path) -> Path:
    """Put kernel KDIR-release's vmlinux (from ``source``, see :func:`vmlinux_for`) in KDIR, atomically."""
    elf = vmlinux_for(source, kdir_release(kdir))
    target = kdir / "vmlinux"
    try:
        os.replace(write_new_temp(target, elf, mode=0o644), target)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write {target}: {exc.strerror}",
                                 fix="run as root, or build against a writable copy of KDIR (--kdir)") from exc
    return target


def needs_resolve_btfids_override(kdir: Path) -> bool:
    return (kdir / "vmlinux").is_file() and not (kdir / "tools/bpf/resolve_btfids/resolve_btfids").is_file()


def can_offer_vmlinux(kdir: Path) -> bool:
    """True when KDIR lacks vmlinux, belongs to the running kernel and the kernel exposes its BTF."""
    return not (kdir / "vmlinux").exists() and SYS_VMLINUX.is_file() and is_running_kernel_kdir(kdir)


def copy_vmlinux(kdir: Path) -> Path:
    """Copy the running kernel's BTF to KDIR/vmlinux so kbuild generates module BTF."""
    target = kdir / "vmlinux"
    try:
        os.replace(write_new_temp(target, SYS_VMLINUX.read_bytes(), mode=0o644), target)
    except OSError as exc:
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
    # SRC may be another user's tree (root builds it): nothing there is written through a planted link.
    state = real_dir(src / STATE_DIR)
    os.replace(write_new_temp(state / ".gitignore", b"*\n", mode=0o644), state / ".gitignore")
    log_path = state / "build.log"
    log_path.unlink(missing_ok=True)
    env = dict(os.environ, PWD=str(src), LC_ALL="C")
    ko = src / f"{MODULE}.ko"
    ko.unlink(missing_ok=True)
    log.info("building %s: %s", src, " ".join(cmd))
    started = time.monotonic()
    lines: list[str] = []
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with open(log_fd, "w") as out:
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


def _read_module(ko: Path) -> bytes:
    """The bytes of a built module; never through a symlink (the tree may be another user's)."""
    try:
        fd = os.open(ko, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise UsageError(f"cannot read {ko}: {why}", fix="rebuild: gtp5g-op build module --src DIR") from None
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise UsageError(f"{ko} is not a regular file", fix="rebuild: gtp5g-op build module --src DIR")
        data = fh.read()
    if not data.startswith(b"\x7fELF"):
        raise UsageError(f"{ko} is not a kernel module (no ELF header)", fix="rebuild: gtp5g-op build module --src DIR")
    return data


def install(ko: Path, kver: str | None = None, root: Path = Path("/")) -> InstallResult:
    """Copy gtp5g.ko to ROOT/lib/modules/KVER/kernel/drivers/net/ (atomically) and run depmod."""
    ko = Path(ko)
    if not ko.is_file():
        raise UsageError(f"{ko} does not exist", fix="build first: gtp5g-op build module --src DIR")
    depmod = shutil.which("depmod")
    if depmod is None:
        raise EnvironmentProblem("depmod not found; nothing was installed", fix="apt-get install kmod")
    data = _read_module(ko)
    kver = kver or kernel_release()
    moddir = Path(root) / "lib" / "modules" / kver
    target_dir = moddir / INSTALL_SUBDIR
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / ko.name
        os.replace(write_new_temp(target, data, mode=0o644), target)
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


@dataclass(frozen=True)
class Device:
    """A network device and the namespace it lives in (``path`` None: this process's own)."""

    name: str
    index: int
    netns: str  # for people: "this namespace", "netns NAME", "netns of pid N (comm)"
    path: str | None = None

    def __str__(self) -> str:
        return f"{self.name} ({self.netns})"


def _netns_paths(proc: Path = Path("/proc")) -> list[tuple[str, str]]:
    """(label, path) of every other network namespace: named ones (ip netns) and those of processes."""
    own = os.stat(proc / "self" / "ns" / "net")
    seen = {(own.st_dev, own.st_ino)}
    found = []
    run_dir = Path("/var/run/netns")
    named = sorted(run_dir.iterdir()) if run_dir.is_dir() else []
    pids = sorted((p for p in proc.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for label, path in [(f"netns {p.name}", p) for p in named] + [(f"netns of pid {p.name}", p / "ns" / "net")
                                                                   for p in pids]:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        if label.startswith("netns of pid"):
            try:
                label += f" ({(path.parent.parent / 'comm').read_text().strip()})"
            except OSError:
                pass
        found.append((label, str(path)))
    return found


def _in_netns(path: str, fn: Callable[[], list]) -> list:
    """Run ``fn`` in a helper thread moved into the network namespace at ``path`` (setns is per thread)."""
    import ctypes
    import threading

    out: list = []
    errors: list[BaseException] = []

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            out.extend(fn())
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.close(fd)

    # The thread ends right after: its changed namespace never serves anything else.
    thread = threading.Thread(target=work, name="netns-scan", daemon=True)
    thread.start()
    thread.join(10)
    if errors:
        raise errors[0]
    return out


def gtp5g_devices(kind: str = GTP5G_KIND, proc: Path = Path("/proc")) -> list[Device]:
    """Every device of ``kind`` on this host: this namespace, named namespaces and those of processes.

    rmmod deletes them all, in every namespace (a UPF in a container has its upfgtp in its own).
    Namespaces this process may not enter (not root) are skipped.
    """
    devices = [Device(name, index, "this namespace") for index, name in links_of_kind(kind)]
    for label, path in _netns_paths(proc):
        try:
            found = _in_netns(path, lambda: links_of_kind(kind))
        except OSError as exc:
            log.debug("cannot look into %s (%s): %s", label, path, exc)
            continue
        devices += [Device(name, index, label, path) for index, name in found]
    return devices


def delete_devices(devices: Sequence[Device]) -> list[str]:
    """Delete each device in its namespace; returns what was done."""
    from pyroute2 import IPRoute

    def delete(index: int) -> list:
        with IPRoute() as ipr:
            ipr.link("del", index=index)
        return []

    done = []
    for dev in devices:
        if dev.path is None:
            delete(dev.index)
        else:
            _in_netns(dev.path, lambda dev=dev: delete(dev.index))
        done.append(f"ip link del {dev.name} ({dev.netns})")
    return done


def check_reload(force: bool = False, module: str = MODULE, proc: Path = Path("/proc"),
                 sys_root: Path = Path("/sys"),
                 find_devices: Callable[[], list[Device]] | None = None) -> tuple[ModuleUse, list[Device]]:
    """Raise now if a reload cannot or must not happen: no module support; devices of kind gtp5g exist
    (unloading deletes them and every session: devices do not raise the use count, so it is checked
    apart) or the module is in use, unless ``force``. Returns the use and the devices found."""
    use = module_use(module, proc, sys_root)
    devices = (find_devices or gtp5g_devices)() if use.loaded else []
    if devices and not force:
        raise OpError(
            f"gtp5g devices exist: {', '.join(map(str, devices))}; reloading gtp5g deletes them and drops "
            "every session on them; nothing was built, installed or unloaded",
            fix="stop the UPF first, or pass --force to delete them and reload",
        )
    if use.loaded and use.refcount > 0 and not force:
        users = f" by {', '.join(use.holders)}" if use.holders else ""
        raise OpError(
            f"{module} is in use ({use.refcount} reference(s){users}); nothing was unloaded",
            fix="stop what uses it first, or pass --force to unload it anyway (drops sessions)",
        )
    return use, devices


def reload(force: bool = False, module: str = MODULE, proc: Path = Path("/proc"),
           sys_root: Path = Path("/sys"),
           run: Callable[[Sequence[str]], subprocess.CompletedProcess] | None = None,
           find_devices: Callable[[], list[Device]] | None = None) -> list[str]:
    """rmmod (when loaded) then modprobe; refuse while gtp5g devices exist or the module is in use,
    unless ``force``.

    With ``force`` the gtp5g devices (e.g. upfgtp, in any namespace) are deleted first, by name, so
    what is dropped is said; ``rmmod -f`` is never used. Returns what was done. ``run`` defaults to
    subprocess.run and ``find_devices`` to :func:`gtp5g_devices` (tests pass their own).
    """
    run = run or (lambda cmd: subprocess.run(list(cmd), capture_output=True, text=True, check=False))
    use, devices = check_reload(force, module, proc, sys_root, find_devices)
    done = delete_devices(devices) if devices else []
    steps = [["rmmod", module]] if use.loaded else []
    steps.append(["modprobe", module])
    for cmd in steps:
        result = run(cmd)
        done.append(" ".join(cmd))
        if result.returncode != 0:
            raise OpError(f"{' '.join(cmd)} failed: {(result.stderr or '').strip() or result.returncode}",
                          fix="see dmesg for the kernel's reason")
    return done
