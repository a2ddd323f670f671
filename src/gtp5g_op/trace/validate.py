"""Validation of trace subjects against the live process table (psutil and /proc).

A subject counts only if the pid is alive, its current comm equals the comm the trace showed, it is not a
kernel thread, it is the same process that was traced (it started no later than the traced event: a later
start means the pid was reused), and, when an allow-list is given, its executable matches a glob in it.

psutil gives the executable (``exe()``, which handles zombies and "(deleted)" paths) and the thread list.
Flags, state and the start time since boot come from one read of ``/proc/<pid>/stat``: psutil does not
expose the PF_KTHREAD flag, and that single read is also the fast rejection path for dead pids.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import psutil

from gtp5g_op.errors import EnvironmentProblem
from gtp5g_op.model import Target

log = logging.getLogger(__name__)

PF_KTHREAD = 0x00200000  # include/linux/sched.h: "I am a kernel thread"
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_CACHE_SIZE = 4096
# A start time is whole clock ticks, rounded down: allow one tick plus slack when comparing.
DEFAULT_START_TOLERANCE = 0.1


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer for one subject. ``code`` is a short, fixed word for metrics labels."""

    ok: bool
    reason: str
    pid: int
    tgid: int | None = None
    comm: str = ""
    create_time: float | None = None  # seconds since the epoch, as psutil.Process.create_time()
    started_at: float | None = None  # seconds since boot (CLOCK_BOOTTIME), the trace clock "boot"
    exe: str | None = None
    code: str = "ok"


class _Stat(NamedTuple):
    comm: str
    state: str
    flags: int
    start_ticks: int


def read_stat(pid: int) -> _Stat | None:
    """comm, state, flags and start time (clock ticks since boot) of ``pid``; None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The comm sits in parentheses and may hold any byte, including ')': split at the LAST ')'.
    head, _, tail = data.rpartition(b")")
    comm = head.partition(b"(")[2].decode("utf-8", "surrogateescape")
    fields = tail.split()  # fields[0] is field 3 (state) of proc(5)
    return _Stat(comm, fields[0].decode(), int(fields[6]), int(fields[19]))


HOST_PID_NS = "run gtp5g-op in the host's PID namespace (docker run --pid=host; Kubernetes hostPID: true)"
HOST_PID_FIX = HOST_PID_NS + ", or watch with --no-validate"

# PROC_PID_INIT_INO (include/linux/proc_ns.h): the inode of the host's (initial) PID namespace.
INIT_PID_NS_INO = 0xEFFFFFFC


def in_host_pid_namespace(ns: Path = Path("/proc/self/ns/pid")) -> bool:
    """True in the host's PID namespace, where trace pids (always the host's) are /proc's pids.

    NSpid in /proc/self/status cannot tell: a container mounts its own /proc, which shows one level.
    """
    try:
        return os.stat(ns).st_ino == INIT_PID_NS_INO
    except OSError:  # no /proc/self/ns: a kernel without namespaces, nothing to refuse
        return True


def require_host_pid_namespace(fix: str = HOST_PID_FIX) -> None:
    """Refuse work that compares traced pids with /proc where /proc cannot see them."""
    if not in_host_pid_namespace():
        raise EnvironmentProblem(
            "this process runs in its own PID namespace, so the host pids in the trace cannot be "
            "checked against /proc", fix)


def current_comm(pid: int) -> str | None:
    """The comm ``pid`` (a process or a thread) has now; None if it does not exist."""
    st = read_stat(pid)
    return st.comm if st is not None else None


def _read_tgid(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    raise ProcessLookupError(pid)


class ProcessValidator:
    """Checks trace subjects against live processes; caches per (pid, start time) in a bounded LRU.

    ``exe_allow`` holds fnmatch globs for the executable path; empty accepts any executable (UERANSIM
    binaries live wherever users built them), so set e.g. ``*/nr-gnb`` and ``*/nr-ue`` in production:
    without it any user can name a process ``nr-gnb`` and get it favoured.
    """

    def __init__(self, exe_allow: Sequence[str] = (), threads: bool = True,
                 cache_size: int = DEFAULT_CACHE_SIZE, start_tolerance: float = DEFAULT_START_TOLERANCE):
        self.exe_allow = tuple(exe_allow)
        self.cover_threads = threads  # the pipeline adds every thread of a valid process when true
        self.start_tolerance = start_tolerance
        self._boot_time = psutil.boot_time()
        # Keyed by (pid, start ticks), so a reused pid never hits an old entry; exceptions are not cached.
        self._identity = functools.lru_cache(maxsize=cache_size)(self._lookup_identity)

    def cache_info(self) -> functools._CacheInfo:
        """Hits, misses and current size of the identity cache."""
        return self._identity.cache_info()

    def _lookup_identity(self, pid: int, start_ticks: int) -> tuple[int, str | None, str]:
        """(tgid, exe, why the exe is unknown) for a live process; raises if it vanished."""
        tgid = _read_tgid(pid)
        if not self.exe_allow:
            return tgid, None, ""
        try:
            return tgid, psutil.Process(tgid).exe() or None, "it has no executable"
        except psutil.AccessDenied:
            return tgid, None, "reading it was denied"
        except psutil.ZombieProcess:
            return tgid, None, "the process is a zombie"

    def _exe_allowed(self, exe: str | None) -> bool:
        return exe is not None and any(fnmatch.fnmatchcase(exe, pattern) for pattern in self.exe_allow)

    def check(self, pid: int, comm: str, tgid: int | None = None, seen_at: float | None = None) -> Verdict:
        """Validate one subject: ``comm`` as traced, ``seen_at`` the event's trace time (s since boot)."""
        if pid <= 0:
            return Verdict(False, "pid 0 is the idle task", pid, tgid, comm, code="idle")
        st = read_stat(pid)
        if st is None or st.state in ("Z", "X"):
            return Verdict(False, "the process has exited", pid, tgid, comm, code="dead")
        started_at = st.start_ticks / CLK_TCK
        if st.flags & PF_KTHREAD:
            return Verdict(False, "a kernel thread is never a target", pid, tgid, comm, code="kthread")
        if st.comm != comm:
            return Verdict(False, f"its comm is now {st.comm!r}, the trace said {comm!r}", pid, tgid, comm,
                           code="comm")
        if seen_at is not None and started_at > seen_at + self.start_tolerance:
            return Verdict(False, f"pid reused: this process started at {started_at:.2f} s, after the traced "
                                  f"event at {seen_at:.2f} s",
                           pid, tgid, comm, started_at=started_at, code="reused")
        try:
            real_tgid, exe, exe_why = self._identity(pid, st.start_ticks)
        except (FileNotFoundError, ProcessLookupError, psutil.NoSuchProcess):
            return Verdict(False, "the process has exited", pid, tgid, comm, code="dead")
        create_time = self._boot_time + started_at
        if tgid is not None and tgid != real_tgid:
            return Verdict(False, f"pid reused: it now belongs to process {real_tgid}, the trace said {tgid}",
                           pid, real_tgid, comm, create_time, started_at, exe, code="reused")
        if self.exe_allow and not self._exe_allowed(exe):
            reason = (f"executable {exe} matches no --exe-allow glob" if exe
                      else f"executable unknown ({exe_why}) and --exe-allow is set")
            return Verdict(False, reason, pid, real_tgid, comm, create_time, started_at, exe, code="exe")
        return Verdict(True, "ok", pid, real_tgid, comm, create_time, started_at, exe)

    def threads(self, tgid: int) -> list[Target]:
        """Every thread of process ``tgid`` with its current comm; [] if the process is gone."""
        try:
            tids = [t.id for t in psutil.Process(tgid).threads()]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return []
        targets = []
        for tid in tids:
            try:
                with open(f"/proc/{tgid}/task/{tid}/comm", "rb") as f:
                    name = f.read().rstrip(b"\n").decode("utf-8", "surrogateescape")
            except (FileNotFoundError, ProcessLookupError):
                continue  # the thread exited between the listing and the read
            targets.append(Target(tid, tgid, name))
        return targets

    def still_alive(self, pid: int, create_time: float | None) -> bool:
        """True if ``pid`` runs and is the process that had ``create_time`` (None: any start time)."""
        st = read_stat(pid)
        if st is None or st.state in ("Z", "X"):
            return False
        if create_time is None:
            return True
        return abs(self._boot_time + st.start_ticks / CLK_TCK - create_time) < 0.5 / CLK_TCK
