"""The one state and lock directory: where gtp5g-op, usually as root, keeps files between runs.

Root writing into a directory someone else controls is how symlink attacks work, so every access goes
through :class:`StateDir`, which

* resolves the directory once, following only symlinks root (or the effective user) owns, and walks it
  from ``/`` component by component with ``O_NOFOLLOW``
  (``openat``-style: each step is opened relative to the verified step before it), creating missing
  components with mode 0700;
* accepts every directory above it only if owned by root (or the effective user) and not writable by
  group or others, unless sticky (``/tmp``: others cannot rename or remove what they do not own);
* accepts the directory itself only if it is a real directory (not a symlink), owned by the effective
  user and not group/other-writable;
* writes a file under a random temporary name with ``O_CREAT|O_EXCL|O_NOFOLLOW``, then renames it over
  the old one (``os.replace`` relative to the directory's descriptor), so a reader sees old or new;
* reads at most ``MAX_READ`` bytes, refusing FIFOs, devices and symlinks;
* keeps locks (flock) in a ``lock/`` subdirectory, named ``<kind>-<name>``, so no instance name can
  collide with a state file or with another kind of lock.

Any OS error is a :class:`StateDirError` (an ``EnvironmentProblem``: one line, exit 3, with the fix).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Self

from gtp5g_op.errors import EnvironmentProblem, UsageError

log = logging.getLogger(__name__)

ROOT_STATE_DIR = Path("/run/gtp5g-op")
ENV_VAR = "GTP5G_OP_STATE_DIR"
MAX_READ = 1 << 20  # state files are a few KiB; anything bigger was not written by us
LOCK_SUBDIR = "lock"
FIX = ("point --state-dir, GTP5G_OP_STATE_DIR or push.state_dir in the config at a writable directory "
       "that only root can change (the DaemonSet mounts one)")
_NAME_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,199}\Z")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class StateDirError(EnvironmentProblem):
    """The state directory or a file in it cannot be used safely."""


def default_state_dir(env: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """``/run/gtp5g-op`` for root, ``$XDG_RUNTIME_DIR/gtp5g-op`` otherwise, else ``~/.local/state/gtp5g-op``."""
    env = os.environ if env is None else env
    if (os.geteuid() if euid is None else euid) == 0:
        return ROOT_STATE_DIR
    runtime = env.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "gtp5g-op" if runtime else Path.home() / ".local/state/gtp5g-op"


def check_name(name: str, what: str = "state file") -> str:
    """A plain file name: letters, digits, ``_.+-``, not starting with a dot, at most 200 characters."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UsageError(f"bad {what} name {name!r}", "use 1-200 characters from letters, digits, '_', '.', '+' "
                         "and '-', not starting with '.'")
    return name


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


class StateDir:
    """A hardened directory for state files and locks (see the module doc). Cheap to create.

    Every operation opens and verifies the directory again, so nothing is cached that could go stale.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path else default_state_dir()
        self.euid = os.geteuid()

    def __repr__(self) -> str:
        return f"StateDir({str(self.path)!r})"

    # --- the directory -----------------------------------------------------------------------------
    def _fail(self, what: str, exc: OSError | None = None, fix: str = FIX) -> StateDirError:
        why = f": {exc.strerror or exc}" if exc is not None else ""
        return StateDirError(f"state directory {self.path}: {what}{why}", fix)

    def _check_ancestor(self, fd: int, shown: str) -> None:
        st = os.fstat(fd)
        if st.st_uid not in (0, self.euid):
            raise self._fail(f"{shown} above it is owned by uid {st.st_uid}, who could swap it")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise self._fail(f"{shown} above it is writable by group or others (mode {_mode(st)})")

    def _check_self(self, fd: int) -> None:
        st = os.fstat(fd)
        if st.st_uid != self.euid:
            raise self._fail(f"owned by uid {st.st_uid}, not by uid {self.euid} who runs gtp5g-op",
                             fix=f"remove it or chown it to uid {self.euid} and chmod 0700; or {FIX}")
        if st.st_mode & 0o022:
            raise self._fail(f"writable by group or others (mode {_mode(st)})",
                             fix=f"chmod go-w {self.path}; or {FIX}")

    def _resolve(self, path: Path) -> Path:
        """``path`` with its symlinks resolved, like ``os.path.realpath``, following only symlinks owned
        by root or the effective user: one another user planted (``/tmp/x -> /etc``) would let them
        choose where root writes. Missing components are kept as written (the walk creates them)."""
        todo, done, hops = list(path.parts[1:]), Path("/"), 0
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                done = done.parent
                continue
            step = done / part
            try:
                st = os.lstat(step)
            except FileNotFoundError:
                return Path(os.path.normpath(step.joinpath(*todo)))
            if not stat.S_ISLNK(st.st_mode):
                done = step
                continue
            if st.st_uid not in (0, self.euid):
                raise self._fail(f"{step} is a symlink owned by uid {st.st_uid}, who chose where it points",
                                 fix=f"give the directory's real path; or {FIX}")
            hops += 1
            if hops > 40:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
            target = Path(os.readlink(step))
            todo = [*target.parts[1:], *todo] if target.is_absolute() else [*target.parts, *todo]
            if target.is_absolute():
                done = Path("/")
        return done

    def _open_dir(self) -> int:
        """Walk to the directory from ``/`` without following symlinks; create what is missing (0700)."""
        try:
            # Symlinks above the directory (/var/run -> /run) are resolved once here, only those root (or
            # we) made; the walk below then refuses any symlink, so a component swapped later is caught.
            parent = self._resolve(self.path.absolute().parent)
        except OSError as exc:
            raise self._fail("cannot resolve its path", exc) from None
        parts = [*parent.parts[1:], self.path.name]
        if not self.path.name or self.path.name in (".", ".."):
            raise self._fail("not a directory name", fix="give the directory's path, e.g. /run/gtp5g-op")
        fd = os.open("/", _DIR_FLAGS)
        shown = "/"
        try:
            self._check_ancestor(fd, shown)
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                shown = os.path.join(shown, part)
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, 0o700, dir_fd=fd)
                        log.info("created state directory %s", shown)
                    except FileExistsError:
                        pass  # created meanwhile by another run: checked below like any other
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
                if last:
                    self._check_self(fd)
                else:
                    self._check_ancestor(fd, shown)
            return fd
        except StateDirError:
            os.close(fd)
            raise
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._fail(f"{shown} is a symlink or not a directory") from None
            raise self._fail(f"cannot open or create {shown}", exc) from None

    @contextlib.contextmanager
    def opened(self) -> Iterator[int]:
        """The verified directory's descriptor for the duration of the block."""
        fd = self._open_dir()
        try:
            yield fd
        finally:
            os.close(fd)

    def ensure(self) -> Path:
        """Create (if needed) and verify the directory now; its path."""
        with self.opened():
            return self.path

    # --- files -------------------------------------------------------------------------------------
    def read(self, name: str, limit: int = MAX_READ) -> bytes | None:
        """The bytes of regular file ``name`` (at most ``limit``); None if it does not exist."""
        check_name(name)
        with self.opened() as dfd:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise self._fail(f"cannot open {name}", exc) from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise self._fail(f"{name} is not a regular file")
                chunks, size = [], 0
                while size <= limit:
                    data = os.read(fd, min(1 << 16, limit + 1 - size))
                    if not data:
                        break
                    chunks.append(data)
                    size += len(data)
            except OSError as exc:
                raise self._fail(f"cannot read {name}", exc) from None
            finally:
                os.close(fd)
        if size > limit:
            raise self._fail(f"{name} is larger than {limit} bytes, so not one of ours",
                             fix=f"remove {self.path / name}")
        return b"".join(chunks)

    def write(self, name: str, data: bytes) -> None:
        """Replace file ``name`` with ``data`` atomically (random temp name, O_EXCL|O_NOFOLLOW, rename)."""
        check_name(name)
        with self.opened() as dfd:
            tmp = f".{name}.{secrets.token_hex(8)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dfd)
            except OSError as exc:
                raise self._fail("cannot create a file in it", exc) from None
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise self._fail(f"cannot write {name}", exc) from None

    def remove(self, name: str) -> None:
        """Remove file ``name`` if it exists."""
        check_name(name)
        with self.opened() as dfd:
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._fail(f"cannot remove {name}", exc) from None

    # --- locks -------------------------------------------------------------------------------------
    def lock(self, kind: str, name: str) -> Lock:
        """An (unacquired) flock on ``lock/<kind>-<name>``; ``kind`` keeps separate users apart."""
        return Lock(self, f"{check_name(kind, 'lock kind')}-{check_name(name, 'lock')}")

    def _open_lock_dir(self) -> int:
        with self.opened() as dfd:
            try:
                os.mkdir(LOCK_SUBDIR, 0o700, dir_fd=dfd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise self._fail(f"cannot create {LOCK_SUBDIR}/", exc) from None
            try:
                fd = os.open(LOCK_SUBDIR, _DIR_FLAGS, dir_fd=dfd)
            except OSError as exc:
                raise self._fail(f"{LOCK_SUBDIR}/ is a symlink or not a directory", exc) from None
        try:
            self._check_self(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd


class Lock:
    """An exclusive flock on a file in the state directory's ``lock/`` holding the owner's pid.

    The kernel drops an flock when its holder dies, even by SIGKILL, so a free lock means no live owner.
    The file is removed on release; :meth:`acquire` notices a file removed between its open and its
    flock and tries again.
    """

    def __init__(self, state_dir: StateDir, filename: str):
        self.state_dir = state_dir
        self.filename = filename
        self.path = state_dir.path / LOCK_SUBDIR / filename
        self._fd: int | None = None
        self._dfd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = False) -> bool:
        """Take the lock; False if another live process holds it (and ``blocking`` is false)."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held")
        dfd = self.state_dir._open_lock_dir()
        try:
            while True:
                fd = os.open(self.filename, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dfd)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_uid != self.state_dir.euid:
                        raise self.state_dir._fail(f"lock {self.filename} is not a regular file of uid "
                                                   f"{self.state_dir.euid}", fix=f"remove {self.path}")
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                    except BlockingIOError:
                        os.close(fd)
                        os.close(dfd)
                        return False
                    try:  # the previous owner may have removed the file between our open and flock
                        same = os.stat(self.filename, dir_fd=dfd, follow_symlinks=False).st_ino == st.st_ino
                    except FileNotFoundError:
                        same = False
                    if same:
                        os.ftruncate(fd, 0)
                        os.write(fd, f"{os.getpid()}\n".encode())
                        self._fd, self._dfd = fd, dfd
                        return True
                    os.close(fd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    raise
        except StateDirError:
            os.close(dfd)
            raise
        except OSError as exc:
            os.close(dfd)
            raise self.state_dir._fail(f"cannot lock {LOCK_SUBDIR}/{self.filename}", exc) from None

    def owner(self) -> int | None:
        """The pid recorded by the holder, if readable."""
        try:
            dfd = self.state_dir._open_lock_dir()
        except StateDirError:
            return None
        try:
            fd = os.open(self.filename, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            try:
                return int(os.read(fd, 32).split()[0])
            finally:
                os.close(fd)
        except (OSError, ValueError, IndexError):
            return None
        finally:
            os.close(dfd)

    def release(self) -> None:
        """Remove the file and drop the lock; safe to call twice."""
        if self._fd is None:
            return
        fd, dfd, self._fd, self._dfd = self._fd, self._dfd, None, None
        try:
            os.unlink(self.filename, dir_fd=dfd)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("could not remove lock file %s: %s", self.path, exc.strerror)
        finally:
            os.close(fd)  # closing drops the flock
            os.close(dfd)  # type: ignore[arg-type]

    def __enter__(self) -> Self:
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
