"""Load and attach BPF objects through libbpf (Debian ``libbpf1``) with ctypes, one verdict per program.

libbpf loads an object as a whole and refuses a second load of the same object, so a program that
cannot load (e.g. an fentry on a gtp5g function that is not in the module's BTF) would take every
other program down with it. :class:`BpfObject` first tries the whole object; when that fails it
loads each program alone in a fresh object to learn its own verdict (errno and libbpf's words),
then loads the programs that passed together and attaches each one.

Fallback: a program ``<name>_kprobe`` in section ``kprobe/F`` (``kretprobe/F``) is the twin of the
fentry (fexit) program ``<name>`` on the same function. With ``kprobe_fallback`` (the default) the twin is attached
where the first choice is refused (e.g. a BPF trampoline for ip4_find_route's 7 arguments before Linux 6.6); the
report keeps one row per first-choice program and names the mechanism that attached it.

Aggregation (tracer/aggregate.h): the object's ``.rodata.agg`` holds the line interval, set before
load; its never-attached ``raw_tp`` program ``gtp5g_op_flush`` prints pending counts when
:meth:`BpfObject.flush` runs it with BPF_PROG_TEST_RUN. :meth:`BpfObject.detach` destroys the links,
then flushes everything, so no event is lost at the end.

No Python binding of libbpf is packaged for Debian or PyPI in a maintained form, so this module
binds the C functions it needs with ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Iterable

from gtp5g_op.errors import EnvironmentProblem, UsageError

log = logging.getLogger(__name__)

LIBBPF_SONAME = "libbpf.so.1"
GTP5G_BTF = Path("/sys/kernel/btf/gtp5g")
TRACEFS_EVENTS = Path("/sys/kernel/tracing/events")  # where libbpf looks up tracepoint ids
ENOTSUPP = 524  # kernel-internal "operation not supported", seen by user space as a raw number
MODULE = "gtp5g"
TWIN_SUFFIX = "_kprobe"  # <fentry program>_kprobe: its kprobe/kretprobe fallback
FLUSH_PROGRAM = "gtp5g_op_flush"
INTERVAL_SECTION = ".rodata.agg"
DEFAULT_INTERVAL = 1.0  # seconds between lines per (thread, hook), the object's own default
MAX_INTERVAL = 3600.0
TRAMPOLINE_MAX_ARGS = 6  # x86-64 BPF trampolines before Linux 6.6 (12 from 6.6 on)
BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO = 12, 13
_TWIN_KIND = {"fentry": "kprobe", "fexit": "kretprobe"}

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
LIBBPF_WARN = 0  # enum libbpf_print_level: WARN, INFO, DEBUG


@dataclass(frozen=True)
class ProgramResult:
    """What happened to one BPF program: ``attached`` (and how), or the ``error`` in plain words."""

    name: str  # the program (C function) name in the object
    section: str  # ELF section, e.g. ``fentry/gtp5g_encap_recv``
    function: str  # the hooked kernel function or tracepoint
    kind: str  # fentry, fexit, tp, ... (the first choice)
    loaded: bool
    attached: bool
    errno: int = 0  # positive errno of the first choice's failing step, 0 when it attached
    error: str = ""  # why nothing attached, in plain words with the fix; empty when attached
    detail: str = ""  # libbpf's own last words about the first choice
    mechanism: str = ""  # what attached: fentry, fexit, kprobe, kretprobe, tp, ...; "" when nothing
    fallback: str = ""  # when a kprobe twin attached: why the first choice was refused

    def to_dict(self) -> dict:
        return asdict(self)


class _TestRunOpts(ctypes.Structure):
    """libbpf's ``struct bpf_test_run_opts`` (libbpf 1.x layout)."""

    _fields_ = [
        ("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


class _BtfType(ctypes.Structure):
    """The kernel's ``struct btf_type`` header: name offset, info (kind, vlen), size/type."""

    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _Libbpf:
    """The libbpf and libc entry points, bound once per process."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot load {LIBBPF_SONAME}: {exc}", fix="apt-get install libbpf1"
            ) from exc
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        vp, cp, ci, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
        sigs = {
            "libbpf_set_print": (vp, [_PRINT_FN]),
            "libbpf_strerror": (ci, [ci, cp, sz]),
            "bpf_object__open_file": (vp, [cp, vp]),
            "bpf_object__load": (ci, [vp]),
            "bpf_object__close": (None, [vp]),
            "bpf_object__next_program": (vp, [vp, vp]),
            "bpf_object__find_map_by_name": (vp, [vp, cp]),
            "bpf_map__set_initial_value": (ci, [vp, vp, sz]),
            "bpf_map__value_size": (ctypes.c_uint32, [vp]),
            "bpf_program__name": (cp, [vp]),
            "bpf_program__section_name": (cp, [vp]),
            "bpf_program__set_autoload": (ci, [vp, ctypes.c_bool]),
            "bpf_program__attach": (vp, [vp]),
            "bpf_program__fd": (ci, [vp]),
            "bpf_prog_test_run_opts": (ci, [ci, ctypes.POINTER(_TestRunOpts)]),
            "bpf_link__destroy": (ci, [vp]),
            "btf__parse_raw": (vp, [cp]),
            "btf__parse_raw_split": (vp, [cp, vp]),
            "btf__find_by_name_kind": (ctypes.c_int32, [vp, cp, ctypes.c_uint32]),
            "btf__type_by_id": (ctypes.POINTER(_BtfType), [vp, ctypes.c_uint32]),
            "btf__free": (None, [vp]),
        }
        for name, (restype, argtypes) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        self.vsnprintf = libc.vsnprintf
        # va_list is passed as a pointer on x86-64 and aarch64 (array type / by-reference aggregate).
        self.vsnprintf.restype = ci
        self.vsnprintf.argtypes = [cp, ctypes.c_size_t, cp, vp]
        self.lock = threading.RLock()  # libbpf's print hook is process-wide; one capture at a time
        self.captured: list[str] | None = None
        self._print_cb = _PRINT_FN(self._on_print)  # keep a reference: libbpf holds a raw pointer
        self.libbpf_set_print(self._print_cb)

    def _on_print(self, level: int, fmt: bytes, va_list: int) -> int:
        buf = ctypes.create_string_buffer(4096)
        n = self.vsnprintf(buf, len(buf), fmt, va_list)
        text = buf.value.decode(errors="replace").rstrip("\n")
        log.debug("%s", text)
        if self.captured is not None and level == LIBBPF_WARN:
            self.captured.extend(line for line in text.splitlines() if line.strip())
        return max(n, 0)

    def strerror(self, err: int) -> str:
        buf = ctypes.create_string_buffer(256)
        self.libbpf_strerror(err, buf, len(buf))
        return buf.value.decode(errors="replace")


_LIB: _Libbpf | None = None
_LIB_LOCK = threading.Lock()


def libbpf() -> _Libbpf:
    """The process-wide libbpf binding (loaded on first use)."""
    global _LIB
    with _LIB_LOCK:
        if _LIB is None:
            _LIB = _Libbpf()
        return _LIB


def split_section(section: str) -> tuple[str, str]:
    """``fentry/gtp5g_encap_recv`` -> (``fentry``, ``gtp5g_encap_recv``); ``tp/a/b`` -> (``tp``, ``a/b``)."""
    kind, _, target = section.partition("/")
    return kind, target or section


def pick_detail(name: str, lines: list[str]) -> str:
    """libbpf's most telling line about program ``name``: the verifier's verdict if it ran,
    else libbpf's first complaint naming the program (e.g. ``failed to find kernel BTF type ID``)."""
    end = next((i for i, ln in enumerate(lines) if "-- END PROG LOAD LOG --" in ln), None)
    if end is not None:
        noise = ("processed ", "verification time", "stack depth", "libbpf: ")
        verdict = [ln.strip() for ln in lines[:end] if ln.strip() and not ln.startswith(noise)]
        if verdict:
            return verdict[-1]
    mine = [ln for ln in lines if f"'{name}'" in ln] or lines
    return mine[0].removeprefix("libbpf: ").strip() if mine else ""


def _errname(err: int) -> str:
    return "ENOTSUPP" if err == ENOTSUPP else errno.errorcode.get(err, str(err))


@dataclass
class Host:
    """What the kernel offers the tracer, read from /proc and /sys (roots replaceable for tests).

    Every answer is about the running kernel: module support, gtp5g loaded and with BTF, the
    function in kallsyms and in gtp5g's BTF (linkage, argument count, read with libbpf's BTF
    parser), kprobes, lockdown.
    """

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    module: str = MODULE
    _kallsyms: set[str] | None = field(default=None, repr=False)
    _btf: dict[tuple[str, bool], tuple[str, int] | None] = field(default_factory=dict, repr=False)

    @property
    def modules_supported(self) -> bool:
        return (self.proc / "modules").exists()

    @property
    def module_loaded(self) -> bool:
        if (self.sys / "module" / self.module).is_dir():
            return True
        try:
            with open(self.proc / "modules", encoding="utf-8", errors="replace") as fh:
                return any(line.split(" ", 1)[0] == self.module for line in fh)
        except OSError:
            return False

    @property
    def module_btf(self) -> Path:
        return self.sys / "kernel" / "btf" / self.module

    @property
    def kprobes_supported(self) -> bool:
        """perf's kprobe PMU, or the legacy kprobe_events file of tracefs."""
        return (self.sys / "bus/event_source/devices/kprobe").exists() or any(
            (self.sys / p / "kprobe_events").exists() for p in ("kernel/tracing", "kernel/debug/tracing"))

    @cached_property
    def lockdown(self) -> str:
        """``none``, ``integrity`` or ``confidentiality`` (the bracketed mode), ``""`` when unknown."""
        try:
            text = (self.sys / "kernel/security/lockdown").read_text()
        except OSError:
            return ""
        match = re.search(r"\[(\w+)\]", text)
        return match[1] if match else ""

    def in_kallsyms(self, function: str) -> bool:
        """Whether the module's symbol table (in /proc/kallsyms) has ``function``."""
        if self._kallsyms is None:
            tag = f"[{self.module}]"
            names: set[str] = set()
            try:
                with open(self.proc / "kallsyms", encoding="utf-8", errors="replace") as fh:
                    for line in fh:
                        parts = line.split()
                        if len(parts) >= 4 and parts[3] == tag:
                            names.add(parts[2])
            except OSError:
                pass
            self._kallsyms = names
        return function in self._kallsyms

    def in_vmlinux(self, function: str) -> bool:
        """Whether ``function`` is a function of the kernel itself (in vmlinux's BTF), not of a module."""
        return self._btf_lookup(function, module=False) is not None

    def btf_function(self, function: str) -> tuple[str, int] | None:
        """(``global``/``static``/``extern``, argument count) of ``function`` in the module's BTF."""
        return self._btf_lookup(function, module=True)

    def _btf_lookup(self, function: str, module: bool) -> tuple[str, int] | None:
        """``function`` in vmlinux's BTF or the module's, parsed once per function (a parse is not cheap)."""
        key = (function, module)
        if key not in self._btf:
            self._btf[key] = self._parse_btf(function, module)
        return self._btf[key]

    def _parse_btf(self, function: str, module: bool) -> tuple[str, int] | None:
        """Parse the BTF with libbpf (vmlinux's, and the module's split on it) and describe ``function``."""
        base_path, mod_path = self.sys / "kernel/btf/vmlinux", self.module_btf
        if not base_path.is_file() or (module and not mod_path.is_file()):
            return None
        lib = libbpf()
        base = lib.btf__parse_raw(os.fsencode(base_path))
        if not base:
            return None
        btf = lib.btf__parse_raw_split(os.fsencode(mod_path), base) if module else base
        try:
            if not btf:
                return None
            fid = lib.btf__find_by_name_kind(btf, function.encode(), BTF_KIND_FUNC)
            if fid <= 0:
                return None
            func = lib.btf__type_by_id(btf, fid).contents
            vlen = func.info & 0xFFFF
            linkage = ("static", "global", "extern")[vlen] if vlen < 3 else "?"
            proto = lib.btf__type_by_id(btf, func.size_or_type)
            if not proto or (proto.contents.info >> 24) & 0x1F != BTF_KIND_FUNC_PROTO:
                return linkage, -1
            return linkage, proto.contents.info & 0xFFFF
        finally:
            if btf and module:
                lib.btf__free(btf)
            lib.btf__free(base)


def module_reason(host: Host) -> str:
    """Why no program on gtp5g can attach because of the module itself, or ``""`` (shared by all).

    In verify's words (``module_btf_problem``): no module support, or gtp5g not loaded.
    """
    if host.modules_supported and host.module_loaded:
        return ""
    from gtp5g_op.kernel.verify import module_btf_problem

    return module_btf_problem(host.module, host.sys, host.proc)


def explain(err: int, kind: str, function: str, stage: str, detail: str = "", host: Host | None = None) -> str:
    """Plain words, with the fix, for a failed load (``stage="load"``) or attach of one program."""
    host = host or Host()
    tracing = kind in ("fentry", "fexit", "fmod_ret")
    probe = kind in ("kprobe", "kretprobe")
    root = os.geteuid() == 0
    if err in (errno.EPERM, errno.EACCES) and not root:
        return "not permitted: run as root or with CAP_BPF+CAP_PERFMON"
    if (tracing or probe) and (why := _function_reason(function, host, need_btf=tracing)):
        return why
    if tracing and err in (ENOTSUPP, errno.EOPNOTSUPP, errno.E2BIG, errno.EINVAL):
        nargs = (host.btf_function(function) or ("", -1))[1]
        if nargs > TRAMPOLINE_MAX_ARGS and (err != errno.EINVAL or "argument" in detail.lower()):
            return (f"{function} takes {nargs} arguments, more than this kernel's BPF trampolines take "
                    f"({TRAMPOLINE_MAX_ARGS} on x86-64 before Linux 6.6)")
        if err != errno.EINVAL:
            return (f"this kernel cannot build a BPF trampoline for {function} ({_errname(err)}): "
                    "fentry/fexit are not supported here for it")
    if err in (errno.ESRCH, errno.ENOENT) and tracing:
        return f"{function} is not in the kernel's BTF as a function: fentry/fexit cannot find it"
    if err == errno.ENOENT and kind in ("tp", "tracepoint"):
        if TRACEFS_EVENTS.is_dir():
            return f"tracepoint {function} does not exist on this kernel"
        return f"tracepoint {function} not found: mount tracefs (mount -t tracefs nodev /sys/kernel/tracing)"
    if probe and not host.kprobes_supported:
        return "this kernel has no kprobes (CONFIG_KPROBES is off)"
    if err == errno.EPERM:
        if host.lockdown in ("integrity", "confidentiality"):
            return (f"kernel lockdown ({host.lockdown}) forbids this {kind} program; boot with lockdown=none "
                    "or trace on a host without lockdown")
        if tracing:
            return ("this kernel refuses fentry/fexit programs even to root (EPERM; some VMs and security "
                    "modules do)")
        return f"not permitted although running as root: a security module refuses this {kind} program"
    if probe and err in (errno.ENOENT, errno.EINVAL, errno.EADDRNOTAVAIL):
        return f"the kernel cannot put a kprobe on {function} ({_errname(err)}): it may be notrace or blacklisted"
    if err == errno.EACCES and stage == "load":
        return "the BPF verifier rejected the program" + (f" ({detail})" if detail else "")
    if err == errno.EINVAL:
        return "the kernel rejected the program as invalid (EINVAL)" + (f": {detail}" if detail else "")
    if err == errno.EBUSY:
        return f"{function} is busy: another program holds an exclusive attachment"
    name = _errname(err)
    return f"{stage} failed with {name} ({os.strerror(err)})" + (f": {detail}" if detail else "")


def _function_reason(function: str, host: Host, need_btf: bool) -> str:
    """Why ``function`` of gtp5g cannot be traced at all (``need_btf``: by fentry/fexit), or ``""``.

    Cheapest first: a function in the loaded gtp5g's BTF exists, so neither vmlinux's BTF nor
    /proc/kallsyms (slow to read) is looked at then.
    """
    if host.btf_function(function) is not None or host.in_vmlinux(function):
        return ""  # in gtp5g's BTF, or a function of the kernel itself: nothing about gtp5g stands in the way
    if why := module_reason(host):
        return why
    if not host.in_kallsyms(function):
        return (f"{function} is not in the loaded gtp5g (absent from /proc/kallsyms): inlined by the "
                "compiler, or not in this gtp5g release (policePacket needs v0.9.0+)")
    if not need_btf:
        return ""
    if not host.module_btf.exists():
        from gtp5g_op.kernel.verify import module_btf_problem

        return module_btf_problem(host.module, host.sys, host.proc)  # the words verify uses too
    # BTF linkage is no verdict: pahole 1.24 (Debian 12) marks every module function static, and
    # fentry attaches to them all the same (measured on gtp5g v0.10.2 under Linux 6.1).
    return (f"{function} is not in gtp5g's BTF: run gtp5g-op patch-module (it makes the function "
            "global and exported), rebuild, reload")


class BpfObject:
    """One compiled BPF object file: open, load (per-program verdicts), attach, and detach on exit.

    ``programs`` limits the object to the named programs (default: all; kprobe twins and the flush
    program come with them). ``interval`` sets the aggregation interval in seconds (0: one line per
    event) for objects that aggregate. ``kprobe_fallback`` attaches a refused fentry/fexit program's
    kprobe twin (on by default; docs/tracer.md says what the VM lab measured with and without it).
    Use as a context manager, or :meth:`open`, then :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, programs: Iterable[str] | None = None,
                 interval: float | None = None, host: Host | None = None, kprobe_fallback: bool = True):
        self.path = Path(path)
        self.kprobe_fallback = kprobe_fallback
        self.wanted = set(programs) if programs is not None else None
        if interval is not None and not 0 <= interval <= MAX_INTERVAL:
            raise UsageError(f"--interval must be between 0 and {MAX_INTERVAL:g} seconds, not {interval:g}",
                             "pass e.g. --interval 1")
        self.interval = interval
        self.host = host or Host()
        self._lib = libbpf()
        self._obj: int | None = None
        self._links: dict[str, int] = {}
        self._results: dict[str, ProgramResult] = {}
        self._sections: dict[str, str] = {}
        self._flush_fd: int | None = None
        self.aggregates = False  # the object has the aggregation map and its flush program

    # -- public --------------------------------------------------------------------------------

    def __enter__(self) -> "BpfObject":
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> "BpfObject":
        """Load and attach every wanted program; failures are recorded per program, not raised."""
        if not self.path.is_file():
            raise UsageError(f"BPF object {self.path} not found", fix="run gtp5g-op build tracer, or fix --obj")
        with self._lib.lock:
            self._sections = self._list_programs()
            primary = [n for n in self._sections if not self._is_twin(n) and n != FLUSH_PROGRAM]
            if self.wanted is not None and (unknown := self.wanted - set(primary)):
                raise UsageError(f"no program named {', '.join(sorted(unknown))} in {self.path}",
                                 fix=f"pick from {', '.join(primary)}")
            names = [n for n in primary if self.wanted is None or n in self.wanted]
            names += [n + TWIN_SUFFIX for n in names if n + TWIN_SUFFIX in self._sections]
            if FLUSH_PROGRAM in self._sections:
                names.append(FLUSH_PROGRAM)
            try:
                loaded = self._load(names)
                self._attach([n for n in names if not self._is_twin(n) and n != FLUSH_PROGRAM], loaded)
            except BaseException:
                self.close()
                raise
        return self

    def flush(self, force: bool = False) -> bool:
        """Print the aggregated counts still pending (``force``: all; else those idle an interval).

        False when the object does not aggregate or the kernel refused the run (logged).
        """
        with self._lib.lock:
            if self._flush_fd is None:
                return False
            args = (ctypes.c_uint64 * 1)(1 if force else 0)
            opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), ctx_in=ctypes.cast(args, ctypes.c_void_p),
                                ctx_size_in=ctypes.sizeof(args))
            rc = self._lib.bpf_prog_test_run_opts(self._flush_fd, ctypes.byref(opts))
        if rc != 0:
            log.warning("flushing the tracer's pending counts failed: %s", self._lib.strerror(-rc))
            return False
        return True

    def detach(self) -> None:
        """Destroy every link, then print every pending count (safe to call twice)."""
        with self._lib.lock:
            had_links = bool(self._links)
            for name, link in self._links.items():
                if self._lib.bpf_link__destroy(link) != 0:
                    log.warning("detaching %s failed", name)
            self._links.clear()
            if had_links:
                self.flush(force=True)

    def close(self) -> None:
        """Detach (with the final flush) and free the object (safe to call twice)."""
        with self._lib.lock:
            self.detach()
            self._flush_fd = None
            if self._obj is not None:
                self._lib.bpf_object__close(self._obj)
                self._obj = None

    @property
    def report(self) -> list[ProgramResult]:
        """One result per wanted first-choice program, in the object's order."""
        return [self._results[n] for n in self._sections if n in self._results]

    @property
    def attached(self) -> list[str]:
        return [r.name for r in self.report if r.attached]

    # -- internals -----------------------------------------------------------------------------

    def _is_twin(self, name: str) -> bool:
        base = name.removesuffix(TWIN_SUFFIX)
        return base != name and base in self._sections

    def _open_file(self) -> int:
        obj = self._lib.bpf_object__open_file(os.fsencode(self.path), None)
        if not obj:
            err = ctypes.get_errno()
            raise UsageError(f"{self.path} is not a BPF object libbpf can open ({self._lib.strerror(-err)})",
                             fix="pass the gtp5g.bpf.o that gtp5g-op build tracer made, or rebuild it")
        return obj

    def _programs(self, obj: int) -> Iterable[tuple[str, int]]:
        prog = self._lib.bpf_object__next_program(obj, None)
        while prog:
            yield self._lib.bpf_program__name(prog).decode(), prog
            prog = self._lib.bpf_object__next_program(obj, prog)

    def _list_programs(self) -> dict[str, str]:
        obj = self._open_file()
        try:
            return {name: self._lib.bpf_program__section_name(p).decode() for name, p in self._programs(obj)}
        finally:
            self._lib.bpf_object__close(obj)

    def _configure(self, obj: int) -> None:
        """Set the aggregation interval in ``.rodata.agg`` (before load)."""
        agg = self._lib.bpf_object__find_map_by_name(obj, INTERVAL_SECTION.encode())
        self.aggregates = bool(agg)
        if not agg or self.interval is None:
            return
        value = ctypes.c_uint64(round(self.interval * 1e9))
        if self._lib.bpf_map__value_size(agg) != ctypes.sizeof(value) or self._lib.bpf_map__set_initial_value(
                agg, ctypes.byref(value), ctypes.sizeof(value)) != 0:
            raise UsageError(f"{self.path} has an unexpected {INTERVAL_SECTION} section",
                             fix="rebuild it with gtp5g-op build tracer")

    def _try_load(self, names: Iterable[str]) -> tuple[int, int, list[str]]:
        """Open a fresh object with only ``names`` autoloaded and load it: (obj, -errno or 0, log)."""
        keep = set(names)
        obj = self._open_file()
        try:
            self._configure(obj)
        except BaseException:
            self._lib.bpf_object__close(obj)
            raise
        for name, prog in self._programs(obj):
            self._lib.bpf_program__set_autoload(prog, name in keep)
        self._lib.captured = []
        try:
            rc = self._lib.bpf_object__load(obj)
        finally:
            captured, self._lib.captured = self._lib.captured, None
        return obj, rc, captured

    def _load(self, names: list[str]) -> dict[str, tuple[int, list[str]]]:
        """Load ``names``, keep the object in ``self._obj``; the errno and log of each that failed."""
        failed: dict[str, tuple[int, list[str]]] = {}
        obj, rc, _ = self._try_load(names)
        if rc == 0:
            self._obj = obj
            return failed
        self._lib.bpf_object__close(obj)
        log.debug("loading %s as a whole failed (%d); trying each program alone", self.path, rc)
        good = []
        for name in names:
            one, rc, lines = self._try_load([name])
            self._lib.bpf_object__close(one)
            if rc == 0:
                good.append(name)
            else:
                failed[name] = (-rc, lines)
        if good:
            obj, rc, lines = self._try_load(good)
            if rc == 0:
                self._obj = obj
            else:  # each loaded alone but not together: report them all with the joint error
                self._lib.bpf_object__close(obj)
                failed.update({name: (-rc, lines) for name in good})
        return failed

    def _attach(self, names: list[str], failed: dict[str, tuple[int, list[str]]]) -> None:
        progs = dict(self._programs(self._obj)) if self._obj is not None else {}
        if FLUSH_PROGRAM in progs and FLUSH_PROGRAM not in failed:
            self._flush_fd = self._lib.bpf_program__fd(progs[FLUSH_PROGRAM])
        elif FLUSH_PROGRAM in self._sections:
            err, lines = failed.get(FLUSH_PROGRAM, (0, []))
            log.warning("the tracer's flush program did not load (%s): counts pending at exit are lost",
                        pick_detail(FLUSH_PROGRAM, lines) or os.strerror(err))
        if any(split_section(self._sections[n])[0] in ("tp", "tracepoint") for n in names):
            _ensure_tracefs()
        for name in names:
            kind, function = split_section(self._sections[name])
            if name in failed:
                err, lines = failed[name]
                stage = "load"
            else:
                err, lines = self._attach_one(name, progs[name])
                stage = "attach"
                if not err:
                    self._results[name] = ProgramResult(name, self._sections[name], function, kind,
                                                        loaded=True, attached=True, mechanism=kind)
                    continue
            detail = pick_detail(name, lines) or self._lib.strerror(err)
            why = explain(err, kind, function, stage, detail, self.host)
            result = ProgramResult(name, self._sections[name], function, kind, loaded=stage == "attach",
                                   attached=False, errno=err, error=why, detail=detail)
            twin = name + TWIN_SUFFIX
            usable = twin in self._sections and (not module_reason(self.host) or self.host.in_vmlinux(function))
            if usable and self.kprobe_fallback:
                result = self._fall_back(result, twin, progs, failed)
            elif usable:
                result = replace(result, error=f"{why}; a kprobe could trace it: drop --no-kprobe-fallback")
            self._results[name] = result

    def _attach_one(self, name: str, prog: int) -> tuple[int, list[str]]:
        """Attach one loaded program: (0, log) and the link kept, or (errno, libbpf's log)."""
        self._lib.captured = []
        try:
            link = self._lib.bpf_program__attach(prog)
            err = ctypes.get_errno()
        finally:
            lines, self._lib.captured = self._lib.captured, None
        if link:
            self._links[name] = link
            return 0, lines
        return err or errno.EINVAL, lines

    def _fall_back(self, first: ProgramResult, twin: str, progs: dict[str, int],
                   failed: dict[str, tuple[int, list[str]]]) -> ProgramResult:
        """Try the kprobe twin of a refused fentry/fexit program; the row says what happened."""
        twin_kind, function = split_section(self._sections[twin])
        if twin in failed:
            err, lines = failed[twin]
            stage = "load"
        else:
            err, lines = self._attach_one(twin, progs[twin])
            stage = "attach"
        if not err:
            log.info("%s: %s refused (%s); attached a %s instead", function, first.kind, first.error, twin_kind)
            return ProgramResult(first.name, first.section, first.function, first.kind, loaded=first.loaded,
                                 attached=True, errno=first.errno, detail=first.detail, mechanism=twin_kind,
                                 fallback=first.error)
        twin_why = explain(err, twin_kind, function, stage, pick_detail(twin, lines), self.host)
        error = first.error if twin_why == first.error else f"{first.kind}: {first.error}; {twin_kind}: {twin_why}"
        return ProgramResult(first.name, first.section, first.function, first.kind, loaded=first.loaded,
                             attached=False, errno=first.errno, error=error, detail=first.detail)


def _ensure_tracefs() -> None:
    """libbpf looks tracepoint ids up in tracefs: mount it when it is not (a failed attach explains why)."""
    from gtp5g_op.trace.tracefs import find_tracefs

    try:
        find_tracefs(mount=True)
    except EnvironmentProblem as exc:
        log.debug("tracefs not available for tracepoint attach: %s", exc.one_line())


def open_tracer(obj: str | os.PathLike | None = None, build_dir: str | os.PathLike | None = None,
                programs: Iterable[str] | None = None, interval: float | None = None,
                kprobe_fallback: bool = True) -> BpfObject:
    """Load and attach the gtp5g tracer (built first when needed); close it to detach.

    Check ``report`` / ``attached``: programs that failed are in the report with the reason.
    ``interval``: seconds between aggregated lines per (thread, hook) (None: 1 s; 0: every event).
    """
    if obj is None:
        from gtp5g_op.kernel.tracer_build import ensure_built

        obj = ensure_built(build_dir)["gtp5g"]
    return BpfObject(obj, programs, interval=interval, kprobe_fallback=kprobe_fallback).open()
