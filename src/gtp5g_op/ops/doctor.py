"""Host readiness: is everything gtp5g-op needs here, and what to do when not.

Each check looks at the real thing: the bpf() syscall creates a map, the fentry check loads a
two-instruction fentry program and attaches it to a kernel function (then closes it), the module checks
read /proc, /sys and kallsyms, devices come from rtnetlink (pyroute2), the API checks detect the API's kind (read-only) and log in.
The fentry probe uses the raw syscall through ctypes rather than libbpf because it needs no object
file: two instructions and a BTF id are the whole program.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gzip
import logging
import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path

from gtp5g_op.config import Settings, load_settings
from gtp5g_op.errors import OpError
from gtp5g_op.kernel import modbuild, verify
from gtp5g_op.model import FAIL, OK, UNKNOWN, WARN, Check

log = logging.getLogger(__name__)

SYS_BTF = Path("/sys/kernel/btf")
_NR_BPF = {"x86_64": 321, "aarch64": 280}
BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN = 0, 5, 17
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_TRACING, BPF_TRACE_FENTRY = 26, 24
# Kernel functions an fentry probe may attach to, first found wins (bpf_fentry_test1 exists for this).
FENTRY_TARGETS = ("bpf_fentry_test1", "do_nanosleep", "ksys_read")


# ---------------------------------------------------------------- bpf() through ctypes


def _bpf(cmd: int, attr: bytes) -> int:
    """Call bpf(2); return the fd, or raise OSError with the kernel's errno."""
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf syscall number unknown for {platform.machine()}")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(nr, cmd, buf, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def check_bpf() -> Check:
    """bpf(2) usable: create (and close) a one-entry array map."""
    attr = struct.pack("<IIII", BPF_MAP_TYPE_ARRAY, 4, 4, 1).ljust(72, b"\0")
    try:
        os.close(_bpf(BPF_MAP_CREATE, attr))
    except OSError as exc:
        fix = ("run as root (or with CAP_BPF + CAP_PERFMON)" if exc.errno in (errno.EPERM, errno.EACCES)
               else "use a kernel with CONFIG_BPF_SYSCALL")
        return Check("bpf", FAIL, f"bpf() refused: {exc.strerror}", fix)
    return Check("bpf", OK, "bpf() syscall works (map created)")


def check_kernel_btf() -> Check:
    path = SYS_BTF / "vmlinux"
    if not path.is_file():
        return Check("kernel BTF", FAIL, f"{path} missing", "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            verify.btf_header(fh.read(24))
    except (OSError, verify.BtfError) as exc:
        return Check("kernel BTF", FAIL, f"{path} unreadable: {exc}", "run as root")
    return Check("kernel BTF", OK, f"{path} ({size // 1024} KiB)")


def kernel_config() -> dict[str, str] | None:
    """The running kernel's config from /proc/config.gz or /boot/config-<release>, None if neither."""
    sources = [(Path("/proc/config.gz"), True), (Path(f"/boot/config-{os.uname().release}"), False)]
    for path, gz in sources:
        try:
            if gz:
                with gzip.open(path, "rt") as fh:
                    text = fh.read()
            else:
                text = path.read_text()
        except OSError:
            continue
        return {k: v for k, _, v in (ln.partition("=") for ln in text.splitlines() if ln.startswith("CONFIG_"))}
    return None


def check_fentry() -> Check:
    """Load a trivial fentry program and attach it to a kernel function, then close it."""
    name = "fentry"
    config = kernel_config()
    config_note = ""
    if config is not None:
        want = ("CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS", "CONFIG_FUNCTION_TRACER", "CONFIG_BPF_JIT")
        missing = [k for k in want if config.get(k) != "y"]
        config_note = (f"; kernel config lacks {', '.join(missing)}" if missing
                       else "; the kernel config has fentry support, so a policy (LSM, lockdown) refuses it")
    try:
        funcs = _vmlinux_func_ids()
    except (OSError, verify.BtfError) as exc:
        return Check(name, UNKNOWN, f"cannot read kernel BTF to pick a function: {exc}{config_note}",
                     "fix kernel BTF first")
    target = next((f for f in FENTRY_TARGETS if f in funcs), None)
    if target is None:
        return Check(name, UNKNOWN, "no probe function in kernel BTF" + config_note, "")
    insns = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)  # r0 = 0; exit
    insn_buf = ctypes.create_string_buffer(insns, len(insns))
    license_buf = ctypes.create_string_buffer(b"GPL")
    attr = bytearray(128)
    struct.pack_into("<IIQQ", attr, 0, BPF_PROG_TYPE_TRACING, 2, ctypes.addressof(insn_buf),
                     ctypes.addressof(license_buf))
    attr[48:48 + 14] = b"gtp5g_op_probe"
    struct.pack_into("<I", attr, 68, BPF_TRACE_FENTRY)
    struct.pack_into("<I", attr, 108, funcs[target])
    try:
        prog = _bpf(BPF_PROG_LOAD, bytes(attr))
    except OSError as exc:
        return Check(name, FAIL, f"loading an fentry program on {target} was refused: {exc.strerror}"
                     + config_note, _fentry_fix(exc.errno))
    try:
        link = _bpf(BPF_RAW_TRACEPOINT_OPEN, struct.pack("<QI", 0, prog).ljust(16, b"\0"))
        os.close(link)
    except OSError as exc:
        return Check(name, FAIL, f"attaching an fentry program to {target} was refused: {exc.strerror}"
                     + config_note, _fentry_fix(exc.errno))
    finally:
        os.close(prog)
    return Check(name, OK, f"fentry program loaded and attached to {target}")


def _fentry_fix(err: int | None) -> str:
    if err in (errno.EPERM, errno.EACCES):
        if os.geteuid() != 0:
            return "run as root (or with CAP_BPF + CAP_PERFMON)"
        return ("this kernel refuses fentry even for root: trace on a host kernel that allows it "
                "(no lockdown/LSM denial, CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS=y)")
    if err == 524:  # ENOTSUPP, kernel-internal: no trampoline support
        return "the kernel has no BPF trampoline for this arch/config: use a newer x86_64/arm64 kernel"
    return "check dmesg and the kernel config (CONFIG_BPF_JIT, CONFIG_FUNCTION_TRACER)"


def _vmlinux_func_ids() -> dict[str, int]:
    reader = verify.BtfReader((SYS_BTF / "vmlinux").read_bytes())
    return {name: type_id for type_id, name, _ in reader.iter_funcs() if name in FENTRY_TARGETS}


def check_tracefs() -> Check:
    from gtp5g_op.errors import EnvironmentProblem
    from gtp5g_op.trace.tracefs import find_tracefs

    try:
        path = find_tracefs(mount=False)
    except EnvironmentProblem as exc:
        return Check("tracefs", FAIL, exc.message, exc.fix or "")
    return Check("tracefs", OK, f"mounted at {path}")


def check_pid_namespace() -> Check:
    from gtp5g_op.trace.validate import HOST_PID_FIX, in_host_pid_namespace

    if not in_host_pid_namespace():
        return Check("PID namespace", FAIL, "not the host's: trace pids are not this /proc's", HOST_PID_FIX)
    return Check("PID namespace", OK, "the host's: trace pids are this /proc's")


def check_module(module: str = "gtp5g", proc: Path = Path("/proc"),
                 sys_root: Path = Path("/sys")) -> list[Check]:
    """gtp5g loaded, its exports (kallsyms), its BTF (/sys/kernel/btf/gtp5g)."""
    try:
        use = modbuild.module_use(module, proc, sys_root)
    except OpError as exc:
        return [Check("gtp5g module", FAIL, exc.message,
                      "run on the UPF host; here use gtp5g-op verify path/to/gtp5g.ko"),
                Check("gtp5g exports", UNKNOWN, "module cannot be loaded here",
                      "gtp5g-op verify path/to/gtp5g.ko"),
                Check("gtp5g BTF", UNKNOWN, "module cannot be loaded here", "")]
    if not use.loaded:
        return [Check("gtp5g module", FAIL, "not loaded",
                      "gtp5g-op build module --src DIR --install --reload (or modprobe gtp5g)"),
                Check("gtp5g exports", UNKNOWN, "module not loaded", "gtp5g-op verify path/to/gtp5g.ko"),
                Check("gtp5g BTF", UNKNOWN, "module not loaded", "")]
    checks = [Check("gtp5g module", OK, f"loaded, {use.refcount} user(s)")]
    try:
        report = verify.verify_loaded(module=module, proc=proc, sys_root=sys_root)
    except (OpError, OSError, verify.BtfError) as exc:
        return checks + [Check("gtp5g exports", UNKNOWN, str(exc), "run gtp5g-op verify --loaded")]
    bad = [f.name for f in report.functions if not f.skipped and not (f.global_symbol and f.exported)]
    detail = f"not exported: {', '.join(bad)}" if bad else f"{len(report.functions)} functions exported"
    checks.append(Check("gtp5g exports", FAIL if bad else OK, detail,
                        "gtp5g-op patch-module --src DIR, then build module --install --reload"))
    if not report.btf_present:
        checks.append(Check("gtp5g BTF", FAIL, f"/sys/kernel/btf/{module} missing",
                            "rebuild with pahole and vmlinux in KDIR: gtp5g-op build module --copy-vmlinux"))
    else:
        missing = [f.name for f in report.functions if not f.skipped and not f.btf_ok]
        detail = f"not global FUNCs in BTF: {', '.join(missing)}" if missing else "all functions in BTF"
        checks.append(Check("gtp5g BTF", FAIL if missing else OK, detail,
                            "gtp5g-op patch-module, then rebuild and reload"))
    return checks


def check_devices(kind: str = "gtp5g", n3: str = "n3") -> list[Check]:
    """Devices of kind gtp5g (upfgtp) and the N3 interface, from rtnetlink."""
    from pyroute2 import IPRoute

    try:
        links = modbuild.links_of_kind(kind)
        with IPRoute() as ipr:
            names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    except OSError as exc:  # pyroute2's NetlinkError is an OSError
        return [Check("devices", UNKNOWN, f"rtnetlink query failed: {exc}", "run as root", required=False)]
    found = ", ".join(name for _, name in links)
    return [
        Check(f"{kind} devices", OK if links else WARN, found or f"no device of kind {kind}",
              "start the UPF (it creates upfgtp)", required=False),
        Check(f"{n3} interface", OK if n3 in names else WARN,
              n3 if n3 in names else f"no interface named {n3}",
              "name your N3 interface n3, or ignore when the UPF uses another name", required=False),
    ]


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.splitlines()[0].strip() if out else ""


def check_tools() -> list[Check]:
    checks = []
    for tool, package, why in (("clang", "clang", "compiles the tracer"),
                               ("bpftool", "bpftool", "makes vmlinux.h for the tracer")):
        path = shutil.which(tool)
        checks.append(Check(tool, OK if path else FAIL,
                            (_version([tool, "--version"]) or path) if path else f"missing ({why})",
                            f"apt-get install {package}"))
    return checks


def check_api(settings: Settings | str, timeout: float = 3.0) -> Check:
    """The API answers, and is of the configured kind (detected read-only: nothing is written)."""
    from gtp5g_op.gthulhu import factory
    from gtp5g_op.gthulhu.detect import NAMES, detect

    if isinstance(settings, str):
        settings = load_settings(env={}, api_url=settings)
    try:
        with factory.probe_http(settings, timeout) as http:
            found = detect(http)
    except OpError as exc:
        transport = any(w in exc.message for w in ("cannot connect", "no answer", "no complete answer", "connection broke"))
        fix = "start the Gthulhu API, or pass --api-url / set GTP5G_OP_API_URL" if transport else exc.fix or ""
        return Check("Gthulhu API", FAIL, exc.message, fix)
    name = NAMES[found.kind]
    if settings.api_kind not in ("auto", found.kind):
        return Check("Gthulhu API", FAIL, f"{settings.api_url} is a {name}, not the configured {settings.api_kind} API",
                     f"use --api {found.kind} (or auto)")
    return Check("Gthulhu API", OK, f"{settings.api_url}: {name} ({found.evidence})")


def check_api_login(settings: Settings, kind: str, timeout: float = 3.0) -> Check:
    """Log in to the API with the configured credentials (a token is obtained, nothing is written).

    A Manager lets a user log in who may then do nothing (a new user must change the password first,
    a role may lack the node policy permissions: every call is a 403), so for a Manager the user's
    policies are read too.
    """
    from gtp5g_op.gthulhu import factory

    name = "API login"
    policies = None
    try:
        with factory.connect(settings, kind) as client:
            client.http.deadline = timeout
            client.authenticate()
            if kind == "manager":
                policies = len(client.list_policies())  # type: ignore[union-attr]
    except OpError as exc:
        return Check(name, FAIL, exc.message, exc.fix or "")
    if kind == "manager":
        return Check(name, OK, f"user {settings.username}: accepted by {settings.api_url}, "
                               f"and may read its node policies ({policies} now)")
    return Check(name, OK, f"a token for the public key (RS256 verified): accepted by {settings.api_url}")


def check_decision_maker(settings: Settings, timeout: float = 3.0) -> Check:
    """Read the node's Decision Maker (``--dm-url``); optional."""
    from gtp5g_op.gthulhu import factory

    try:
        reader = factory.dm_reader(settings)
        assert reader is not None
        with reader.client as client:
            client.http.deadline = timeout
            entries = reader.entries()
    except OpError as exc:
        return Check("Decision Maker", FAIL, exc.message, exc.fix or "", required=False)
    return Check("Decision Maker", OK, f"{settings.dm_url}: {len(entries)} resolved entries", required=False)


def api_checks(settings: Settings) -> list[Check]:
    """The API's kind, the login, and (with --dm-url) the Decision Maker."""
    from gtp5g_op.gthulhu.detect import LEGACY, MANAGER, NAMES

    kind_check = check_api(settings)
    checks = [kind_check]
    if kind_check.ok:
        kind = MANAGER if NAMES[MANAGER] in kind_check.detail else LEGACY
        checks.append(check_api_login(settings, kind))
    if settings.dm_url:
        checks.append(check_decision_maker(settings))
    return checks


def run_checks(settings: Settings | str) -> list[Check]:
    """Every check, in the order people read them."""
    if isinstance(settings, str):
        settings = load_settings(env={}, api_url=settings)
    checks = [check_tracefs(), check_pid_namespace(), check_bpf(), check_kernel_btf(), check_fentry()]
    checks += check_module()
    checks += check_devices()
    checks += check_tools()
    checks += api_checks(settings)
    return checks


def all_ready(checks: list[Check]) -> bool:
    return all(c.status == OK for c in checks if c.required)
