"""Check, the way the kernel sees it, that gtp5g exports the functions the tracer attaches to.

Per function: a global function in the symbol table, exported (``__ksymtab_<name>`` in the module, or in
Module.symvers), and, when the module carries BTF, a FUNC with global linkage. ELF is read with
pyelftools. pyelftools does not decode BTF, so ``BtfReader`` below reads the ``.BTF`` section (or
/sys/kernel/btf/<module>) itself: the format is a fixed header, a type table of fixed-size records and a
string table (kernel Documentation/bpf/btf.rst), and only FUNC names and linkage are needed. This keeps
``verify`` working on hosts without bpftool.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from gtp5g_op import userfiles
from gtp5g_op.errors import EnvironmentProblem, UsageError

log = logging.getLogger(__name__)

BTF_MAGIC = 0xEB9F
KIND_FUNC = 12
LINKAGE = {0: "static", 1: "global", 2: "extern"}
# Bytes that follow the 12-byte common record, per kind: (fixed, per vlen entry).
_KIND_TAIL = {
    1: (4, 0), 2: (0, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 7: (0, 0), 8: (0, 0),
    9: (0, 0), 10: (0, 0), 11: (0, 0), 12: (0, 0), 13: (0, 8), 14: (4, 0), 15: (0, 12), 16: (0, 0),
    17: (4, 0), 18: (0, 0), 19: (0, 12),
}
SYS_BTF = Path("/sys/kernel/btf")


class BtfError(ValueError):
    """The data is not BTF this reader understands."""


@dataclass(frozen=True)
class BtfHeader:
    hdr_len: int
    type_off: int
    type_len: int
    str_off: int
    str_len: int
    endian: str


def btf_header(data: bytes) -> BtfHeader:
    """Parse the BTF header (either byte order)."""
    for endian in "<>":
        if len(data) >= 24 and struct.unpack_from(endian + "H", data)[0] == BTF_MAGIC:
            _, _, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(endian + "HBBIIIII", data)
            return BtfHeader(hdr_len, type_off, type_len, str_off, str_len, endian)
    raise BtfError("no BTF magic")


class BtfReader:
    """FUNC records of one BTF blob; ``base_str_len`` is the base's string size for split (module) BTF."""

    def __init__(self, data: bytes, base_str_len: int = 0):
        self.data = data
        self.hdr = btf_header(data)
        start = self.hdr.hdr_len
        self.types = data[start + self.hdr.type_off : start + self.hdr.type_off + self.hdr.type_len]
        self.strings = data[start + self.hdr.str_off : start + self.hdr.str_off + self.hdr.str_len]
        self.base_str_len = base_str_len

    def name(self, off: int) -> str | None:
        """The string at ``off``, or None when it is in the base or not at a string boundary."""
        local = off - self.base_str_len
        if local < 0 or local >= len(self.strings) or (local > 0 and self.strings[local - 1] != 0):
            return None
        end = self.strings.find(b"\0", local)
        return self.strings[local:end].decode("ascii", "replace")

    def iter_funcs(self, first_id: int = 1) -> Iterator[tuple[int, str | None, str]]:
        """Yield (type id, name, linkage) of every FUNC record; ids count from ``first_id``."""
        fmt = self.hdr.endian + "III"
        pos, n, type_id = 0, len(self.types), first_id
        while pos + 12 <= n:
            name_off, info, _ = struct.unpack_from(fmt, self.types, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind not in _KIND_TAIL:
                raise BtfError(f"unknown BTF kind {kind} at type offset {pos}")
            if kind == KIND_FUNC:
                yield type_id, self.name(name_off), LINKAGE.get(vlen, str(vlen))
            fixed, each = _KIND_TAIL[kind]
            pos += 12 + fixed + each * vlen
            type_id += 1

    def func_linkage(self) -> dict[str, str]:
        """Name -> linkage of every FUNC whose name resolves."""
        return {name: linkage for _, name, linkage in self.iter_funcs() if name}


def base_str_len(base: Path) -> int:
    """String-table size of a base BTF: a raw blob (/sys/kernel/btf/vmlinux) or an ELF's .BTF section."""
    with open(base, "rb") as fh:
        head = fh.read(24)
    try:
        return btf_header(head).str_len
    except BtfError:
        data = _elf_btf(base)
        if data is None:
            raise BtfError(f"{base} holds no BTF") from None
        return btf_header(data).str_len


def _elf_btf(path: Path) -> bytes | None:
    with open(path, "rb") as fh:
        try:
            elf = ELFFile(fh)
        except ELFError:
            return None
        sec = elf.get_section_by_name(".BTF")
        return sec.data() if sec is not None else None


@dataclass
class FunctionCheck:
    name: str
    global_symbol: bool
    exported: bool
    btf: str | None  # "global", "static", "absent"; None when the module has no BTF
    # False when the BTF encoder wrote linkage=static for every FUNC (pahole 1.24 does, measured):
    # then presence is what counts, as fentry attaches by BTF id whatever the linkage says.
    btf_linkage_recorded: bool = True
    present: bool = True  # the module has a symbol of this name at all (local or global)
    required: bool = True  # named by the user: absence fails; from the default set: absence is skipped

    @property
    def skipped(self) -> bool:
        return not self.present and not self.required

    @property
    def btf_ok(self) -> bool:
        if self.btf is None:
            return True
        return self.btf == "global" or (self.btf == "static" and not self.btf_linkage_recorded)

    @property
    def ok(self) -> bool:
        return self.skipped or (self.global_symbol and self.exported and self.btf_ok)

    def as_dict(self) -> dict:
        return {"name": self.name, "present": self.present, "global": self.global_symbol,
                "exported": self.exported, "btf": self.btf, "btf_ok": self.btf_ok, "ok": self.ok}


@dataclass
class VerifyReport:
    source: str
    btf_present: bool
    functions: list[FunctionCheck]
    notes: list[str] = field(default_factory=list)
    # Why the module's BTF is missing or unusable (fentry attaches by BTF id, so the tracer cannot
    # attach), empty when it is fine. Fails the report unless ``allow_no_btf``.
    btf_problem: str = ""
    allow_no_btf: bool = False

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.functions) and (not self.btf_problem or self.allow_no_btf)

    def as_dict(self) -> dict:
        return {"source": self.source, "btf_present": self.btf_present, "btf_problem": self.btf_problem,
                "allow_no_btf": self.allow_no_btf, "ok": self.ok,
                "notes": self.notes, "functions": [f.as_dict() for f in self.functions]}


NO_BTF_BUILD = ("no .BTF section: module BTF was not generated (kbuild needs pahole and the target "
                "kernel's vmlinux in KDIR), so the tracer cannot attach to it")
BTF_FIX = ("rebuild with the target kernel's vmlinux in KDIR: gtp5g-op build module --copy-vmlinux "
           "(running kernel) or --vmlinux /boot/vmlinuz-<release> (another kernel)")


def module_btf_problem(module: str = "gtp5g", sys_root: Path = Path("/sys"), proc: Path = Path("/proc")) -> str:
    """Why fentry cannot find ``module``'s functions in BTF, in plain words; "" when its BTF is there.

    For the tracer's loader: "not loaded" and "loaded without BTF" need different fixes. A module
    loads without BTF when it was built without (no vmlinux in KDIR) or when the kernel rejected its
    BTF (built against another kernel's vmlinux: dmesg says ``failed to validate module [gtp5g] BTF``).
    """
    if (sys_root / "kernel" / "btf" / module).is_file():
        return ""
    if not (sys_root / "module" / module).is_dir():
        if not (proc / "modules").exists():
            return (f"{module} cannot be loaded on this kernel (no module support, CONFIG_MODULES off): "
                    "run the tracer on the UPF host")
        return f"{module} is not loaded (no {sys_root}/module/{module}): load it (modprobe {module})"
    return (f"{module} is loaded without BTF (no {sys_root}/kernel/btf/{module}): it was built without "
            f"module BTF, or the kernel rejected its BTF (built against another kernel's vmlinux; dmesg "
            f"says 'failed to validate module [{module}] BTF'); {BTF_FIX}, then reload it")


def default_functions() -> list[str]:
    """Names of the bundled export set."""
    from gtp5g_op.kernel.patcher import load_export_set

    return [spec.name for spec in load_export_set().functions]


def read_symvers(path: Path) -> set[str]:
    """Exported names listed in a Module.symvers file."""
    names = set()
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 4 and parts[3].startswith("EXPORT_SYMBOL"):
            names.add(parts[1])
    return names


def verify_ko(ko: Path, names: Sequence[str] | None = None, symvers: Path | None = None,
              base_btf: Path | None = None, allow_no_btf: bool = False) -> VerifyReport:
    """Check a gtp5g.ko file. ``symvers`` defaults to Module.symvers next to it when present.

    Without ``names`` the bundled export set is checked and a function the module lacks entirely
    (e.g. policePacket before gtp5g v0.9) is reported as skipped, not failed. A module without BTF,
    or whose BTF does not fit ``base_btf`` (default: the running kernel's), fails unless ``allow_no_btf``.
    """
    required = names is not None
    names = list(names or default_functions())
    ko = Path(ko)
    fix = (f"give the module file in it: gtp5g-op verify {ko / 'gtp5g.ko'}" if os.path.isdir(ko)
           else "build it first: gtp5g-op build module --src DIR")
    userfiles.check(ko, "module", fix=fix)
    global_funcs: set[str] = set()
    any_funcs: set[str] = set()
    ksymtab: set[str] = set()
    try:
        with userfiles.open_binary(ko, "module") as fh:
            elf = ELFFile(fh)
            symtab = elf.get_section_by_name(".symtab")
            if not isinstance(symtab, SymbolTableSection):
                raise UsageError(f"{ko} has no symbol table (stripped?)", fix="verify an unstripped build")
            for sym in symtab.iter_symbols():
                if sym.name.startswith("__ksymtab_"):
                    ksymtab.add(sym.name[len("__ksymtab_"):])
                elif sym["st_info"]["type"] == "STT_FUNC" and sym["st_shndx"] != "SHN_UNDEF":
                    any_funcs.add(sym.name)
                    if sym["st_info"]["bind"] == "STB_GLOBAL":
                        global_funcs.add(sym.name)
            btf_data = elf.get_section_by_name(".BTF")
            btf_data = btf_data.data() if btf_data is not None else None
    except ELFError as exc:
        raise UsageError(f"{ko} is not an ELF file: {exc}", fix="pass the built gtp5g.ko") from exc
    notes = []
    symvers = symvers if symvers is not None else ko.with_name("Module.symvers")
    if symvers.is_file():
        listed = read_symvers(symvers)
        for name in names:
            if (name in listed) != (name in ksymtab):
                notes.append(f"{symvers} disagrees with the .ko about {name} (stale? rebuild); "
                             "the .ko's __ksymtab decides")
    btf = None
    problem = ""
    if btf_data is None:
        problem = NO_BTF_BUILD
    else:
        btf, problem = _btf_linkage(btf_data, base_btf)
    report = _report(str(ko), names, required, any_funcs, global_funcs, ksymtab, btf, notes)
    report.btf_problem, report.allow_no_btf = problem, allow_no_btf
    return report


def _btf_linkage(data: bytes, base_btf: Path | None) -> tuple[dict[str, str] | None, str]:
    """FUNC linkage of a module's split BTF read on ``base_btf``, and what is wrong with it ("" if nothing).

    Split BTF continues the base's string table: built against another kernel's vmlinux, its names do
    not resolve on this base, and that kernel refuses it at load (``failed to validate module BTF``).
    """
    base = base_btf or SYS_BTF / "vmlinux"
    try:
        linkage = BtfReader(data, base_str_len(base)).func_linkage()
    except (OSError, BtfError) as exc:
        return None, f"module BTF not readable with base {base}: {exc}"
    if linkage:
        return linkage, ""
    try:  # a module BTF that is not split (no base) resolves on its own
        alone = BtfReader(data, 0).func_linkage()
    except BtfError:
        alone = {}
    if alone:
        return alone, ""
    return None, (f"module BTF does not fit the base BTF {base}: it was built against another kernel's "
                  f"vmlinux, and a kernel with that base rejects it at load (the module then loads "
                  f"without BTF); pass --base-btf with the target kernel's vmlinux if this module is for "
                  f"another kernel")


def _report(source: str, names: Sequence[str], required: bool, any_funcs: set[str],
            global_funcs: set[str], exported: set[str], btf: dict[str, str] | None,
            notes: list[str]) -> VerifyReport:
    recorded = btf is not None and "global" in btf.values()
    if btf and not recorded:
        notes.append("this BTF marks every FUNC linkage=static (pahole 1.24 does): the BTF check is presence")
    checks = [
        FunctionCheck(n, n in global_funcs, n in exported, None if btf is None else btf.get(n, "absent"),
                      recorded, present=n in any_funcs or n in exported or bool(btf and n in btf),
                      required=required)
        for n in names
    ]
    return VerifyReport(source, btf is not None, checks, notes)


def verify_loaded(names: Sequence[str] | None = None, module: str = "gtp5g", proc: Path = Path("/proc"),
                  sys_root: Path = Path("/sys"), allow_no_btf: bool = False) -> VerifyReport:
    """Check the loaded module: /proc/kallsyms for global and ``__ksymtab_`` symbols, its BTF in sysfs."""
    required = names is not None
    names = list(names or default_functions())
    if not (proc / "modules").exists():
        raise EnvironmentProblem(
            "this kernel has no loadable module support (no /proc/modules, CONFIG_MODULES off)",
            fix="verify a built file instead: gtp5g-op verify path/to/gtp5g.ko",
        )
    if not (sys_root / "module" / module).is_dir():
        raise EnvironmentProblem(f"{module} is not loaded",
                                 fix=f"modprobe {module}, or verify a file: gtp5g-op verify gtp5g.ko")
    global_funcs: set[str] = set()
    any_funcs: set[str] = set()
    ksymtab: set[str] = set()
    tag = f"[{module}]"
    with open(proc / "kallsyms", errors="replace") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) < 4 or parts[3] != tag:
                continue
            kind, sym = parts[1], parts[2]
            if sym.startswith("__ksymtab_"):
                ksymtab.add(sym[len("__ksymtab_"):])
            elif kind in ("T", "t"):
                any_funcs.add(sym)
                if kind == "T":
                    global_funcs.add(sym)
    notes = []
    if global_funcs == set() and ksymtab == set():
        notes.append("no symbols of the module in kallsyms (kptr_restrict? run as root)")
    btf_path = sys_root / "kernel" / "btf" / module
    btf = None
    if btf_path.is_file():
        base = sys_root / "kernel" / "btf" / "vmlinux"
        btf = BtfReader(btf_path.read_bytes(), base_str_len(base)).func_linkage()
    report = _report(f"loaded {module}", names, required, any_funcs, global_funcs, ksymtab, btf, notes)
    report.btf_problem, report.allow_no_btf = module_btf_problem(module, sys_root, proc), allow_no_btf
    return report
