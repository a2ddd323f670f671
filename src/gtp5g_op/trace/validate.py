"""Validation of trace subjects against the live process table (psutil and /proc).

A subject counts only if the pid is alive, its current comm equals the comm the trace showed, it is not a
kernel thread, it is the same process that was traced (it started no later than the traced event: a later
start means the pid was reused), and its executable is one a target may run:

* named like a target (its file name matches the target pattern), or, when an allow-list is given,
  matching one of its absolute path patterns: renaming a process is not enough;
* owned by root and not group/other-writable, in directories that are all root's and not
  group/other-writable (sticky ones such as /tmp aside, except the executable's own directory: a sticky
  bit stops others removing entries, not adding hard links), run by a process in the host's user
  namespace (in one of its own, a user can bind-mount any program over an installed path): a binary an
  unprivileged user could have planted is not enough either (``allow_user_writable_exe`` turns this off);
* optionally run by an allowed (real) uid.

The executable is read from ``/proc/<pid>/exe`` (the inode that runs, even if renamed or deleted) and its
directories through ``/proc/<pid>/root`` (the process's own view, so a containerised gNB is checked in its
image), between two reads of the start time: a pid reused meanwhile is caught. Flags, state and start time
come from one read of ``/proc/<pid>/stat``: psutil does not expose PF_KTHREAD, and that single read is
also the fast rejection path for dead pids.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import psutil

from gtp5g_op.config import DEFAULT_MATCH, check_exe_patterns
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


def _read_ids(pid: int) -> tuple[int, int]:
    """(tgid, real uid) of ``pid`` from /proc/<pid>/status."""
    tgid = uid = None
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Tgid:"):
                tgid = int(line.split()[1])
            elif line.startswith(b"Uid:"):
                uid = int(line.split()[1])
                break  # Uid: comes after Tgid:
    if tgid is None or uid is None:
        raise ProcessLookupError(pid)
    return tgid, uid


def exe_matches(exe: str, pattern: str) -> bool:
    """Does the absolute path ``exe`` match the absolute ``pattern``, one path component at a time?

    pathlib's match: ``/opt/*/build/nr-gnb`` matches ``/opt/UERANSIM/build/nr-gnb`` but ``/*/nr-gnb`` does
    not match ``/tmp/x/nr-gnb`` (fnmatch's ``*`` would cross ``/``).
    """
    return PurePosixPath(exe).match(pattern)


class _Identity(NamedTuple):
    tgid: int
    exe: str | None  # None when it cannot be read
    exe_why: str  # why the executable is unknown
    untrusted: str  # why a non-root user could have planted it; "" if they could not (or not checked)


# PROC_USER_INIT_INO (include/linux/proc_ns.h): the inode of the host's (initial) user namespace.
INIT_USER_NS_INO = 0xEFFFFFFD


def _foreign_user_ns(pid: int) -> bool:
    """True when ``pid`` runs in a user namespace other than the host's (or it cannot be told).

    There any user is root over its own mount namespace: it can bind-mount a program of its choice over
    an installed, root-owned path, which /proc/<pid>/exe and /proc/<pid>/root then show as that path.
    """
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino != INIT_USER_NS_INO
    except FileNotFoundError:
        return not os.path.exists("/proc/self/ns/user")  # no user namespaces at all: nothing foreign
    except OSError:
        return True


def _untrusted(pid: int, exe: str, exe_st: os.stat_result) -> str:
    """Why the running executable or a directory above it is not root's alone; "" when it is."""
    if _foreign_user_ns(pid):
        return ("it runs in a user namespace of its own, where any user can mount another program over "
                f"{exe}")
    if exe_st.st_uid != 0:
        return f"executable {exe} is owned by uid {exe_st.st_uid}, not root"
    if exe_st.st_mode & 0o022:
        return f"executable {exe} is writable by group or others (mode {stat.S_IMODE(exe_st.st_mode):04o})"
    root = f"/proc/{pid}/root"  # the process's view of the file system (its container's, if any)
    if exe_st.st_nlink:  # not deleted: the path must still name the running file
        try:
            now = os.lstat(root + exe)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (exe_st.st_dev, exe_st.st_ino):
            return f"{exe} no longer names the file the process runs"
    exe_dir = PurePosixPath(exe).parent
    for parent in PurePosixPath(exe).parents:
        try:
            st = os.lstat(root + "/" if str(parent) == "/" else root + str(parent))
        except OSError as exc:
            return f"directory {parent} cannot be checked ({exc.strerror})"
        if not stat.S_ISDIR(st.st_mode):
            return f"{parent} is no longer a directory"
        if st.st_uid != 0:
            return f"directory {parent} is owned by uid {st.st_uid}, not root"
        # Sticky (/tmp) keeps others from renaming or removing what is there, not from adding a hard link
        # to a root-owned program under a target's name (fs.protected_hardlinks=0): only higher up is it safe.
        if st.st_mode & 0o022 and (not st.st_mode & stat.S_ISVTX or parent == exe_dir):
            return f"directory {parent} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


class ProcessValidator:
    """Checks trace subjects against live processes; caches per (pid, start time, executable) in a bounded LRU.

    The executable rules (module doc): with ``exe_allow`` empty, the executable's file name must fully
    match ``exe_names`` (the target pattern; None: no name rule); otherwise its path must match one of the
    absolute ``exe_allow`` patterns. Unless ``allow_user_writable_exe``, it and its directories must be
    root's and not group/other-writable. ``uid_allow`` (empty: any) lists the real uids a target may have.
    """

    def __init__(self, exe_allow: Sequence[str] = (), threads: bool = True,
                 cache_size: int = DEFAULT_CACHE_SIZE, start_tolerance: float = DEFAULT_START_TOLERANCE, *,
                 exe_names: str | None = DEFAULT_MATCH, allow_user_writable_exe: bool = False,
                 uid_allow: Sequence[int] = ()):
        self.exe_allow = check_exe_patterns(exe_allow)
        self.exe_names = re.compile(exe_names) if exe_names and not self.exe_allow else None
        self.allow_user_writable_exe = allow_user_writable_exe
        self.uid_allow = frozenset(uid_allow)
        self._read_exe = bool(self.exe_allow or self.exe_names or not allow_user_writable_exe)
        self.cover_threads = threads  # the pipeline adds every thread of a valid process when true
        self.start_tolerance = start_tolerance
        self._boot_time = psutil.boot_time()
        # Keyed by (pid, start ticks, executable inode): a reused pid or an execve never hits an old
        # entry. Exceptions are not cached.
        self._identity = functools.lru_cache(maxsize=cache_size)(self._lookup_identity)

    def cache_info(self) -> functools._CacheInfo:
        """Hits, misses and current size of the identity cache."""
        return self._identity.cache_info()

    def _lookup_identity(self, pid: int, start_ticks: int, exe_dev: int, exe_ino: int) -> _Identity:
        """(tgid, exe, why unknown, why untrusted) of a live task; raises if it vanished."""
        tgid = _read_ids(pid)[0]
        if not self._read_exe:
            return _Identity(tgid, None, "", "")
        if exe_ino < 0:
            return _Identity(tgid, None, "reading it was denied", "")
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            exe_st = os.stat(f"/proc/{pid}/exe")
        except PermissionError:
            return _Identity(tgid, None, "reading it was denied", "")
        if (exe_st.st_dev, exe_st.st_ino) != (exe_dev, exe_ino):
            raise ProcessLookupError(pid)  # it ran execve meanwhile: the caller sees "exited", retried later
        if not exe_st.st_nlink:
            exe = exe.removesuffix(" (deleted)")
        untrusted = "" if self.allow_user_writable_exe else _untrusted(pid, exe, exe_st)
        return _Identity(tgid, exe, "", untrusted)

    def _exe_allowed(self, exe: str) -> bool:
        return any(exe_matches(exe, pattern) for pattern in self.exe_allow)

    def _exe_verdict(self, exe: str | None, why: str, untrusted: str) -> tuple[str, str] | None:
        """(code, reason) when the executable disqualifies the subject, else None."""
        if not self._read_exe:
            return None
        if exe is None:
            return "exe", f"executable unknown ({why}), so it cannot be checked"
        if self.exe_allow and not self._exe_allowed(exe):
            return "exe", f"executable {exe} matches no --exe-allow path"
        if self.exe_names is not None and not self.exe_names.fullmatch(os.path.basename(exe)[:15]):
            return "exe", (f"executable {exe} is not named like a target: a renamed program is no target "
                           f"(pass --exe-allow {exe} if it is one)")
        if untrusted:
            return "untrusted", (f"{untrusted}: a non-root user could have planted it "
                                 "(--allow-user-writable-exe accepts it)")
        return None

    def check(self, pid: int, comm: str, tgid: int | None = None, seen_at: float | None = None) -> Verdict:
        """Validate one subject: ``comm`` as traced, ``seen_at`` the event's trace time (s since boot)."""
        if pid <= 0:
            return Verdict(False, "pid 0 is the idle task", pid, tgid, comm, code="idle")
        st = read_stat(pid)
        if st is None or st.state in ("Z", "X"):
            return Verdict(False, "the process has exited", pid, tgid, comm, code="dead")
        started_at = st.start_ticks / CLK_TCK
        create_time = self._boot_time + started_at  # rejections carry it too: the pipeline re-checks by it
        if st.flags & PF_KTHREAD:
            return Verdict(False, "a kernel thread is never a target", pid, tgid, comm, create_time, started_at,
                           code="kthread")
        if st.comm != comm:
            return Verdict(False, f"its comm is now {st.comm!r}, the trace said {comm!r}", pid, tgid, comm,
                           create_time, started_at, code="comm")
        if seen_at is not None and started_at > seen_at + self.start_tolerance:
            return Verdict(False, f"pid reused: this process started at {started_at:.2f} s, after the traced "
                                  f"event at {seen_at:.2f} s",
                           pid, tgid, comm, create_time, started_at, code="reused")
        try:
            exe_dev = exe_ino = -1
            if self._read_exe:
                try:
                    exe_st = os.stat(f"/proc/{pid}/exe")
                    exe_dev, exe_ino = exe_st.st_dev, exe_st.st_ino
                except PermissionError:
                    pass  # the identity says "reading it was denied"
            ident = self._identity(pid, st.start_ticks, exe_dev, exe_ino)
            uid = _read_ids(pid)[1] if self.uid_allow else None
        except (FileNotFoundError, ProcessLookupError, psutil.NoSuchProcess):
            return Verdict(False, "the process has exited", pid, tgid, comm, code="dead")
        after = read_stat(pid)  # everything above must be about the process that was there before
        if after is None or after.start_ticks != st.start_ticks or after.state in ("Z", "X"):
            return Verdict(False, "the process has exited", pid, tgid, comm, code="dead")
        real_tgid, exe = ident.tgid, ident.exe
        if tgid is not None and tgid != real_tgid:
            return Verdict(False, f"pid reused: it now belongs to process {real_tgid}, the trace said {tgid}",
                           pid, real_tgid, comm, create_time, started_at, exe, code="reused")
        bad_exe = self._exe_verdict(exe, ident.exe_why, ident.untrusted)
        if bad_exe:
            return Verdict(False, bad_exe[1], pid, real_tgid, comm, create_time, started_at, exe, code=bad_exe[0])
        if uid is not None and uid not in self.uid_allow:
            return Verdict(False, f"it runs as uid {uid}, which --uid-allow does not list", pid, real_tgid, comm,
                           create_time, started_at, exe, code="uid")
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
