"""Load and attach BPF objects through libbpf (Debian ``libbpf1``) with ctypes, one verdict per program.

libbpf loads an object as a whole and refuses a second load of the same object, so a program that
cannot load (e.g. an fentry on a gtp5g function that is not in the module's BTF) would take every
other program down with it. :class:`BpfObject` first tries the whole object; when that fails it
loads each program alone in a fresh object to learn its own verdict (errno and libbpf's words),
then loads the programs that passed together and attaches each one. Nothing stays attached after
``close()`` / leaving the ``with`` block.

No Python binding of libbpf is packaged for Debian or PyPI in a maintained form, so this module
binds the dozen C functions it needs with ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Iterable

from gtp5g_op.errors import EnvironmentProblem, OpError

log = logging.getLogger(__name__)

LIBBPF_SONAME = "libbpf.so.1"
GTP5G_BTF = Path("/sys/kernel/btf/gtp5g")
TRACEFS_EVENTS = Path("/sys/kernel/tracing/events")  # where libbpf looks up tracepoint ids
ENOTSUPP = 524  # kernel-internal "operation not supported", seen by user space as a raw number

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
LIBBPF_WARN = 0  # enum libbpf_print_level: WARN, INFO, DEBUG


@dataclass(frozen=True)
class ProgramResult:
    """What happened to one BPF program: ``attached`` or the ``error`` in plain words."""

    name: str  # the program (C function) name in the object
    section: str  # ELF section, e.g. ``fentry/gtp5g_encap_recv``
    function: str  # the hooked kernel function or tracepoint
    kind: str  # fentry, fexit, tp, ...
    loaded: bool
    attached: bool
    errno: int = 0  # positive errno of the failing step, 0 when attached
    error: str = ""  # plain words with the fix; empty when attached
    detail: str = ""  # libbpf's own last words about this program

    def to_dict(self) -> dict:
        return asdict(self)


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
        vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        sigs = {
            "libbpf_set_print": (vp, [_PRINT_FN]),
            "libbpf_strerror": (ci, [ci, cp, ctypes.c_size_t]),
            "bpf_object__open_file": (vp, [cp, vp]),
            "bpf_object__load": (ci, [vp]),
            "bpf_object__close": (None, [vp]),
            "bpf_object__next_program": (vp, [vp, vp]),
            "bpf_program__name": (cp, [vp]),
            "bpf_program__section_name": (cp, [vp]),
            "bpf_program__set_autoload": (ci, [vp, ctypes.c_bool]),
            "bpf_program__attach": (vp, [vp]),
            "bpf_link__destroy": (ci, [vp]),
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


def explain(err: int, kind: str, function: str, stage: str, detail: str = "") -> str:
    """Plain words, with the fix, for a failed load (``stage="load"``) or attach of one program."""
    tracing = kind in ("fentry", "fexit", "fmod_ret")
    root = os.geteuid() == 0
    if err in (errno.ESRCH, errno.ENOENT) and tracing:
        from gtp5g_op.kernel.verify import module_btf_problem

        problem = module_btf_problem()  # not loaded, or loaded without (or with rejected) BTF
        text = f"{function} is not in gtp5g's BTF as a global function: "
        if problem:
            text += f"{problem}; if it still fails, "
        return text + "run gtp5g-op patch-module, rebuild, reload"
    if err == errno.ENOENT and kind in ("tp", "tracepoint"):
        if TRACEFS_EVENTS.is_dir():
            return f"tracepoint {function} does not exist on this kernel"
        return f"tracepoint {function} not found: mount tracefs (mount -t tracefs nodev /sys/kernel/tracing)"
    if err in (errno.EPERM, errno.EACCES) and not root:
        return "not permitted: run as root or with CAP_BPF+CAP_PERFMON"
    if err == errno.EPERM:
        if tracing:
            return (
                "not permitted although running as root: this kernel refuses fentry/fexit "
                "programs (some VMs and lockdown do); run the tracer on a host that allows them"
            )
        return "not permitted although running as root: kernel lockdown or a security module refuses BPF"
    if err == errno.EACCES and stage == "load":
        return "the BPF verifier rejected the program" + (f" ({detail})" if detail else "")
    if err == errno.E2BIG or (err == errno.EINVAL and tracing and "argument" in detail):
        return f"{function} has more arguments than this kernel's BPF trampolines take (kernel 6.3+ takes 12)"
    if err in (ENOTSUPP, errno.EOPNOTSUPP):
        return f"{kind} programs are not supported by this kernel"
    if err == errno.EINVAL:
        return "the kernel rejected the program as invalid (EINVAL)" + (f": {detail}" if detail else "")
    if err == errno.EBUSY:
        return f"{function} is busy: another program holds an exclusive attachment"
    name = errno.errorcode.get(err, str(err))
    return f"{stage} failed with {name} ({os.strerror(err)})" + (f": {detail}" if detail else "")


class BpfObject:
    """One compiled BPF object file: open, load (per-program verdicts), attach, and detach on exit.

    ``programs`` limits the object to the named programs (default: all). Use as a context manager,
    or call :meth:`open`, then :meth:`close` in a ``finally``.
    """

    def __init__(self, path: str | os.PathLike, programs: Iterable[str] | None = None):
        self.path = Path(path)
        self.wanted = set(programs) if programs is not None else None
        self._lib = libbpf()
        self._obj: int | None = None
        self._links: dict[str, int] = {}
        self._results: dict[str, ProgramResult] = {}
        self._sections: dict[str, str] = {}

    # -- public --------------------------------------------------------------------------------

    def __enter__(self) -> "BpfObject":
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> "BpfObject":
        """Load and attach every wanted program; failures are recorded per program, not raised."""
        if not self.path.is_file():
            raise OpError(f"BPF object {self.path} not found", fix="run gtp5g-op build tracer")
        with self._lib.lock:
            self._sections = self._list_programs()
            names = [n for n in self._sections if self.wanted is None or n in self.wanted]
            if self.wanted is not None and (unknown := self.wanted - set(self._sections)):
                raise OpError(f"no program named {', '.join(sorted(unknown))} in {self.path}",
                              fix=f"pick from {', '.join(self._sections)}")
            try:
                loadable = self._load(names)
                if loadable:
                    self._attach(loadable)
            except BaseException:
                self.close()
                raise
        return self

    def close(self) -> None:
        """Detach every link and free the object (safe to call twice)."""
        with self._lib.lock:
            for name, link in self._links.items():
                if self._lib.bpf_link__destroy(link) != 0:
                    log.warning("detaching %s failed", name)
            self._links.clear()
            if self._obj is not None:
                self._lib.bpf_object__close(self._obj)
                self._obj = None

    @property
    def report(self) -> list[ProgramResult]:
        """One result per wanted program, in the object's order."""
        return [self._results[n] for n in self._sections if n in self._results]

    @property
    def attached(self) -> list[str]:
        return [r.name for r in self.report if r.attached]

    # -- internals -----------------------------------------------------------------------------

    def _open_file(self) -> int:
        obj = self._lib.bpf_object__open_file(os.fsencode(self.path), None)
        if not obj:
            err = ctypes.get_errno()
            raise OpError(f"libbpf cannot open {self.path}: {self._lib.strerror(-err)}",
                          fix="rebuild it with gtp5g-op build tracer")
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

    def _try_load(self, names: Iterable[str]) -> tuple[int, int, list[str]]:
        """Open a fresh object with only ``names`` autoloaded and load it: (obj, -errno or 0, log)."""
        keep = set(names)
        obj = self._open_file()
        for name, prog in self._programs(obj):
            self._lib.bpf_program__set_autoload(prog, name in keep)
        self._lib.captured = []
        try:
            rc = self._lib.bpf_object__load(obj)
        finally:
            captured, self._lib.captured = self._lib.captured, None
        return obj, rc, captured

    def _load(self, names: list[str]) -> list[str]:
        """Load ``names``; keep the loaded object in ``self._obj``; return the names that loaded."""
        obj, rc, _ = self._try_load(names)
        if rc == 0:
            self._obj = obj
            return names
        self._lib.bpf_object__close(obj)
        log.debug("loading %s as a whole failed (%d); trying each program alone", self.path, rc)
        good = []
        for name in names:
            one, rc, lines = self._try_load([name])
            self._lib.bpf_object__close(one)
            if rc == 0:
                good.append(name)
            else:
                self._fail(name, -rc, "load", lines)
        if not good:
            return []
        obj, rc, lines = self._try_load(good)
        if rc != 0:  # each loaded alone but not together: report them all with the joint error
            self._lib.bpf_object__close(obj)
            for name in good:
                self._fail(name, -rc, "load", lines)
            return []
        self._obj = obj
        return good

    def _attach(self, names: list[str]) -> None:
        assert self._obj is not None
        progs = dict(self._programs(self._obj))
        if any(split_section(self._sections[n])[0] in ("tp", "tracepoint") for n in names):
            _ensure_tracefs()
        for name in names:
            self._lib.captured = []
            try:
                link = self._lib.bpf_program__attach(progs[name])
                err = ctypes.get_errno()
            finally:
                lines, self._lib.captured = self._lib.captured, None
            if link:
                self._links[name] = link
                kind, function = split_section(self._sections[name])
                self._results[name] = ProgramResult(name, self._sections[name], function, kind,
                                                    loaded=True, attached=True)
            else:
                self._fail(name, err or errno.EINVAL, "attach", lines, loaded=True)

    def _fail(self, name: str, err: int, stage: str, lines: list[str], loaded: bool = False) -> None:
        section = self._sections[name]
        kind, function = split_section(section)
        detail = pick_detail(name, lines) or self._lib.strerror(err)
        self._results[name] = ProgramResult(
            name, section, function, kind, loaded=loaded, attached=False, errno=err,
            error=explain(err, kind, function, stage, detail), detail=detail,
        )


def _ensure_tracefs() -> None:
    """libbpf looks tracepoint ids up in tracefs: mount it when it is not (a failed attach explains why)."""
    from gtp5g_op.errors import EnvironmentProblem
    from gtp5g_op.trace.tracefs import find_tracefs

    try:
        find_tracefs(mount=True)
    except EnvironmentProblem as exc:
        log.debug("tracefs not available for tracepoint attach: %s", exc.one_line())


def open_tracer(obj: str | os.PathLike | None = None, build_dir: str | os.PathLike | None = None,
                programs: Iterable[str] | None = None) -> BpfObject:
    """Load and attach the gtp5g tracer (built first when needed); close it to detach.

    Check ``report`` / ``attached``: programs that failed are in the report with the reason.
    """
    if obj is None:
        from gtp5g_op.kernel.tracer_build import ensure_built

        obj = ensure_built(build_dir)["gtp5g"]
    return BpfObject(obj, programs).open()
