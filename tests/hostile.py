"""Helpers for the hostile-input tests: run code as another (real) user, plant things as that user."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

NOBODY = 65534


def require_root(reason: str = "needs root to switch users") -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{reason}: not running as root")


def as_user(func: Callable[[], Any], uid: int = NOBODY, gid: int = NOBODY) -> Any:
    """Run ``func`` in a forked child with real and effective ``uid``/``gid``; return its result.

    An exception in the child is re-raised here (pickled back), so a test sees what the user would see.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        os.close(rfd)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out: Any = ("ok", func())
        except BaseException as exc:  # noqa: BLE001 - handed to the parent
            out = ("raised", exc)
        try:
            data = pickle.dumps(out)
        except Exception as exc:  # noqa: BLE001
            data = pickle.dumps(("raised", RuntimeError(f"unpicklable result: {exc!r}")))
        with os.fdopen(wfd, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "raised":
        raise value
    return value


def popen_as(cmd: list[str], uid: int = NOBODY, gid: int = NOBODY, **kw: Any) -> subprocess.Popen:
    """Start ``cmd`` as a real other user (setgid + setuid before exec)."""
    return subprocess.Popen(cmd, user=uid, group=gid, extra_groups=[], **kw)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


@pytest.fixture
def open_tmp() -> Any:
    """A root-owned 0755 directory directly in /tmp that other users can reach (tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="gtp5g-op-hostile-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
