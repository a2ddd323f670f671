"""Every path a user hands to gtp5g-op is opened here, so every bad path gets the same one-line error.

A user-supplied path (``--config``, ``--set``, ``--replay``, ``--trace-pipe``, ``--public-key``,
``verify KO`` ...) can be missing, a directory, unreadable, a FIFO or device where a file is meant, binary
or not UTF-8 where text is meant, or far too big. Each case raises :class:`~gtp5g_op.errors.UsageError`
(exit 2) naming the option's role, the path and what to do. Files are opened first and checked with
``fstat`` on the open descriptor (no window between the check and the read), with ``O_NONBLOCK`` so a
FIFO given where a file is expected is refused instead of blocking until a writer comes. Symlinks are
followed: Kubernetes mounts ConfigMaps and Secrets as symlinks.

Adopt it with one call::

    text = userfiles.read_text(path, "config file")                       # TOML, PEM, ...
    data = userfiles.read_bytes(path, "public key", limit=64 << 10)
    with userfiles.open_binary(path, "replay file", kinds=STREAMS) as fh: ...
    userfiles.check(path, "gtp5g source tree", kinds={DIRECTORY})        # paths handed to other tools

``fix`` (optional) replaces the generic advice for the "missing" and "wrong kind" cases.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection
from pathlib import Path
from typing import BinaryIO

from gtp5g_op.errors import UsageError

# Kinds of file, as fstat reports them.
REGULAR, FIFO, DIRECTORY, CHAR_DEVICE, BLOCK_DEVICE, SOCKET = (
    "regular file", "FIFO", "directory", "character device", "block device", "socket")
FILES = frozenset({REGULAR})
STREAMS = frozenset({REGULAR, FIFO})  # a capture or a pipe: read to its end
TEXT_LIMIT = 1 << 20  # config files, keys, export sets: 1 MiB is far above any real one
SNIFF = 1 << 16  # bytes looked at to tell text from binary data


def kind_of(mode: int) -> str:
    """The kind of file an ``st_mode`` describes (one of the constants above)."""
    for test, name in ((stat.S_ISREG, REGULAR), (stat.S_ISDIR, DIRECTORY), (stat.S_ISFIFO, FIFO),
                       (stat.S_ISCHR, CHAR_DEVICE), (stat.S_ISBLK, BLOCK_DEVICE), (stat.S_ISSOCK, SOCKET)):
        if test(mode):
            return name
    return "special file"


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _wanted(kinds: Collection[str]) -> str:
    return " or ".join(_article(k) for k in sorted(kinds, key=lambda k: (k != REGULAR, k)))


def _missing(path: Path, what: str, fix: str | None) -> UsageError:
    if path.is_symlink():
        return UsageError(f"{what} {path} is a symlink to {os.readlink(path)}, which does not exist",
                          fix or "point it at an existing file or give the real path")
    parent = next((p for p in path.parents if p.exists()), None)
    where = "" if parent is None or parent == path.parent else f" ({path.parent} does not exist either)"
    return UsageError(f"{what} {path} does not exist{where}", fix or "check the path")


def _os_error(exc: OSError, path: Path, what: str, fix: str | None) -> UsageError:
    """The one-line error for an OSError met while opening or reading ``path``."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return _missing(path, what, fix)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return UsageError(f"{what} {path} is not readable by uid {os.geteuid()} (permission denied)",
                          f"check its mode and owner (ls -l {path}), or run as a user who may read it")
    if exc.errno == errno.EISDIR:
        return wrong_kind(path, what, DIRECTORY, FILES, fix)
    if exc.errno == errno.ELOOP:
        return UsageError(f"{what} {path} is a symlink loop", "give the real path")
    return UsageError(f"cannot read {what} {path}: {exc.strerror or exc}", fix or "check the path")


def wrong_kind(path: Path | str, what: str, found: str, kinds: Collection[str], fix: str | None = None) -> UsageError:
    """The error for ``path`` being ``found`` (a kind) where one of ``kinds`` was expected."""
    path = Path(path)
    if found == DIRECTORY:
        default = f"give a file, not a directory (ls {path})"
    else:
        default = f"give {_wanted(kinds)}"
    return UsageError(f"{what} {path} is {_article(found)}, not {_wanted(kinds)}", fix or default)


def check(path: str | os.PathLike, what: str, *, kinds: Collection[str] = FILES, readable: bool = True,
          fix: str | None = None) -> Path:
    """Check that ``path`` exists, is one of ``kinds`` and (``readable``) may be read; return it as a Path.

    For paths handed to another tool (a directory for make, an object for libbpf); what gtp5g-op reads
    itself goes through :func:`open_binary`, :func:`read_bytes` or :func:`read_text`.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _os_error(exc, path, what, fix) from None
    found = kind_of(st.st_mode)
    if found not in kinds:
        raise wrong_kind(path, what, found, kinds, fix)
    if readable and not os.access(path, os.R_OK | (os.X_OK if found == DIRECTORY else 0)):
        raise _os_error(OSError(errno.EACCES, "permission denied"), path, what, fix)
    return path


def open_fd(path: str | os.PathLike, what: str, *, kinds: Collection[str] = FILES, fix: str | None = None,
            nonblocking: bool = False) -> int:
    """Open ``path`` read-only, refuse it unless it is one of ``kinds``; the descriptor (the caller closes it).

    The open never blocks (a FIFO without a writer included); ``nonblocking`` keeps O_NONBLOCK set.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_error(exc, path, what, fix) from None
    try:
        found = kind_of(os.fstat(fd).st_mode)
        if found not in kinds:
            raise wrong_kind(path, what, found, kinds, fix)
        if not nonblocking:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_binary(path: str | os.PathLike, what: str, *, kinds: Collection[str] = FILES,
                fix: str | None = None) -> BinaryIO:
    """Open ``path`` for reading bytes; refused unless it is one of ``kinds``."""
    return os.fdopen(open_fd(path, what, kinds=kinds, fix=fix), "rb")


def read_bytes(path: str | os.PathLike, what: str, *, limit: int = TEXT_LIMIT, fix: str | None = None) -> bytes:
    """The contents of the regular file ``path``, refused when larger than ``limit`` bytes."""
    path = Path(path)
    with open_binary(path, what, fix=fix) as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise _os_error(exc, path, what, fix) from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {limit} bytes", f"check that {path} is the right file")
    return data


_CONTROL_BYTES = bytes([*range(0, 9), 11, 12, *range(14, 27), *range(28, 32), 127])  # not \t \n \r ESC
BINARY_SHARE = 0.05  # a stream with more NUL or control bytes than this is binary data, not text


def binary_evidence(data: bytes, strict: bool = True) -> str | None:
    """Why ``data`` (the first bytes of a file or stream) is binary rather than text; None when it may be text.

    ``strict``: any NUL byte decides (a config file or key never holds one). Otherwise (a trace, where a
    stray garbage line may hold one) more than BINARY_SHARE of NUL and control bytes decide; the
    evidence names the share.
    """
    sample = data[:SNIFF]
    if strict and (nul := sample.find(b"\0")) >= 0:
        return f"a NUL byte at offset {nul}"
    if not sample:
        return None
    control = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    if control > BINARY_SHARE * len(sample):
        return f"{control} of its first {len(sample)} bytes ({control / len(sample):.0%}) are NUL or control bytes"
    return None


def decode_text(data: bytes, path: str | os.PathLike, what: str, fix: str | None = None) -> str:
    """``data`` (read from ``path``) as UTF-8 text, refused when binary or not UTF-8."""
    why = binary_evidence(data)
    if why:
        raise UsageError(f"{what} {path} is binary data, not text ({why})", fix or f"give the text file meant as {what}")
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is dropped, not an error
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            f"convert it, e.g. iconv -t UTF-8 {path}",
        ) from None


def read_text(path: str | os.PathLike, what: str, *, limit: int = TEXT_LIMIT, fix: str | None = None) -> str:
    """The contents of the regular file ``path`` as UTF-8 text (config files, keys, export sets)."""
    return decode_text(read_bytes(path, what, limit=limit, fix=fix), path, what, fix)
