"""Build the bundled BPF tracer: ``vmlinux.h`` from BTF with bpftool, then clang for each ``*.bpf.c``.

The sources ship in the package (``gtp5g_op/data/tracer``, a link to ``tracer/`` in a source
checkout). gtp5g's own types come from the module's BTF when gtp5g is loaded
(``/sys/kernel/btf/gtp5g``, dumped on top of the kernel's BTF), else from the tracer's minimal
declarations in ``gtp5g_types.h``; the programs only need those as opaque pointers.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from gtp5g_op import DATA_DIR
from gtp5g_op.errors import EnvironmentProblem, OpError, UsageError

log = logging.getLogger(__name__)

KERNEL_BTF = Path("/sys/kernel/btf/vmlinux")
MODULE_BTF = Path("/sys/kernel/btf/gtp5g")
BPF_HEADERS = Path("/usr/include/bpf/bpf_helpers.h")
# The objects the tracer is made of: name -> source file.
OBJECTS = {"gtp5g": "gtp5g.bpf.c", "selftest": "selftest.bpf.c"}
_ARCH = {"x86_64": "x86", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "powerpc",
         "s390x": "s390", "riscv64": "riscv"}


def default_out_dir() -> Path:
    """Where built objects go unless told otherwise: ``$XDG_CACHE_HOME/gtp5g-op/tracer``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "gtp5g-op" / "tracer"


def source_dir() -> Path:
    """The tracer sources (``tracer/``, shipped as package data)."""
    candidate = DATA_DIR / "tracer"
    if (candidate / OBJECTS["gtp5g"]).is_file():
        return candidate
    raise OpError("the tracer sources (gtp5g.bpf.c) are not installed with gtp5g-op",
                  fix="reinstall gtp5g-op, or run from a source checkout that has tracer/")


def object_paths(out_dir: Path | None = None) -> dict[str, Path]:
    """Where :func:`build_tracer` puts each object (they may not exist yet)."""
    out = Path(out_dir) if out_dir else default_out_dir()
    return {name: out / src.replace(".c", ".o") for name, src in OBJECTS.items()}


def is_stale(out_dir: Path | None = None) -> bool:
    """True when an object is missing or older than a tracer source."""
    src = source_dir()
    newest = max(p.stat().st_mtime for p in src.iterdir() if p.suffix in (".c", ".h"))
    objs = object_paths(out_dir).values()
    return any(not os.path.isfile(o) or o.stat().st_mtime < newest for o in objs)  # isfile: EACCES is "no"


def _tool(name: str, fix: str) -> str:
    path = shutil.which(name)
    if not path:
        raise EnvironmentProblem(f"{name} is not installed", fix=fix)
    return path


def _run(cmd: list[str], what: str, fix: str) -> str:
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-6:]) or f"exit code {proc.returncode}"
        raise OpError(f"{what} failed: {tail}", fix=fix)
    return proc.stdout


def check_btf_file(path: Path, what: str, option: str) -> None:
    """Refuse a file that is not BTF (raw, as in /sys/kernel/btf, or an ELF with a .BTF section)."""
    from gtp5g_op.kernel.verify import BtfError, base_str_len

    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory, not {what}", fix=f"pass {what} file")
    try:
        base_str_len(path)
    except (BtfError, OSError) as exc:
        raise UsageError(f"{option} {path} is not {what}: {getattr(exc, 'strerror', None) or exc}",
                         fix=f"pass {what}, e.g. {KERNEL_BTF if option == '--kernel-btf' else MODULE_BTF}") from None


def clang_target_flags() -> list[str]:
    """``-D__TARGET_ARCH_<arch>`` and the multiarch include dir (asm/types.h) for this machine."""
    machine = platform.machine()
    arch = _ARCH.get(machine)
    if arch is None:
        raise EnvironmentProblem(f"building the tracer on {machine} is not supported",
                                 fix="build on x86_64 or aarch64")
    flags = [f"-D__TARGET_ARCH_{arch}"]
    multiarch = Path(f"/usr/include/{machine}-linux-gnu")
    if machine == "armv7l":
        multiarch = Path("/usr/include/arm-linux-gnueabihf")
    if multiarch.is_dir():
        flags.append(f"-I{multiarch}")
    return flags


def base_btf_args(bpftool: str, kernel_btf: Path) -> list[str]:
    """How this bpftool takes the base BTF of a split (module) BTF.

    bpftool 7.x (Debian 12 ships 7.1) takes the global option ``-B FILE`` / ``--base-btf FILE``, which
    its ``btf help`` lists; anything else gets the ``base FILE`` keyword form after the file.
    """
    proc = subprocess.run([bpftool, "btf", "help"], capture_output=True, text=True, check=False)
    if "--base-btf" in proc.stdout + proc.stderr:
        return ["--base-btf", str(kernel_btf)]
    return ["base", str(kernel_btf)]


def write_vmlinux_h(out_dir: Path, kernel_btf: Path = KERNEL_BTF, module_btf: Path | None = None) -> Path:
    """Dump ``vmlinux.h`` (kernel types, plus the module's when ``module_btf`` is given) into ``out_dir``."""
    bpftool = _tool("bpftool", "apt-get install bpftool")
    if not kernel_btf.is_file():
        raise EnvironmentProblem(f"the kernel exposes no BTF ({kernel_btf} is missing)",
                                 fix="use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    if module_btf is not None:
        base = base_btf_args(bpftool, kernel_btf)
        dump = ["btf", "dump", "file", str(module_btf)]
        cmd = [bpftool, *dump, *base] if base[0] == "base" else [bpftool, *base, *dump]
        cmd += ["format", "c"]
    else:
        cmd = [bpftool, "btf", "dump", "file", str(kernel_btf), "format", "c"]
    text = _run(cmd, "dumping BTF with bpftool",
                fix="check that the BTF files belong together (the module's BTF was built on this kernel's)")
    out = out_dir / "vmlinux.h"
    out.write_text(text)
    log.info("wrote %s from %s (%d bytes)", out, module_btf or kernel_btf, len(text))
    return out


def build_tracer(out_dir: str | os.PathLike | None = None, kernel_btf: str | os.PathLike = KERNEL_BTF,
                 module_btf: str | os.PathLike | None = None) -> dict[str, Path]:
    """Compile every tracer object into ``out_dir``; returns ``{"gtp5g": path, "selftest": path}``.

    ``module_btf`` None means: use gtp5g's BTF when the module is loaded, else ``gtp5g_types.h``.
    """
    clang = _tool("clang", "install clang (apt-get install clang llvm)")
    if not BPF_HEADERS.is_file():
        raise EnvironmentProblem(f"libbpf's BPF headers are missing ({BPF_HEADERS})",
                                 fix="apt-get install libbpf-dev")
    out = Path(out_dir) if out_dir else default_out_dir()
    kernel_btf = Path(kernel_btf)
    if module_btf is None and MODULE_BTF.is_file():
        module_btf = MODULE_BTF
    if module_btf is not None:
        module_btf = Path(module_btf)
        if not module_btf.is_file():
            raise UsageError(f"module BTF {module_btf} not found", fix="load gtp5g or drop --module-btf")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out}: {exc.strerror}",
                         fix="pass a writable directory (--out for build tracer, --build-dir for tracer run "
                             "and selftest)") from exc
    if kernel_btf.is_file():  # a missing one is the kernel's problem, said by write_vmlinux_h
        check_btf_file(kernel_btf, "the kernel's BTF", "--kernel-btf")
    if module_btf is not None:
        check_btf_file(module_btf, "gtp5g's BTF", "--module-btf")
    write_vmlinux_h(out, kernel_btf, module_btf)
    src = source_dir()
    flags = ["-g", "-O2", "-target", "bpf", *clang_target_flags(), f"-I{out}", f"-I{src}"]
    if module_btf is not None:
        flags.append("-DGTP5G_OP_MODULE_BTF=1")
    built = {}
    for name, obj in object_paths(out).items():
        _run([clang, *flags, "-c", str(src / OBJECTS[name]), "-o", str(obj)], f"compiling {OBJECTS[name]}",
             fix="run with -vv to see the command; check the tracer sources and clang's version")
        log.info("built %s", obj)
        built[name] = obj
    return built


def ensure_built(out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The tracer objects, built first when missing or older than the sources."""
    out = Path(out_dir) if out_dir else default_out_dir()
    if is_stale(out):
        return build_tracer(out)
    return object_paths(out)
