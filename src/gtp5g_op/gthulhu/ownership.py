"""The legacy API's ownership file: which PIDs gtp5g-op put on one server (moved verbatim from sync.py)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

WATCH, MANUAL = "watch", "manual"  # who put a PID there: a running watch, or `strategies push`


# --- ownership ------------------------------------------------------------------------------------


def default_state_dir() -> Path:
    """``/run/gtp5g-op`` for root, ``$XDG_RUNTIME_DIR/gtp5g-op`` otherwise, else ``~/.local/state/gtp5g-op``."""
    if os.geteuid() == 0:
        return Path("/run/gtp5g-op")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "gtp5g-op" if runtime else Path.home() / ".local/state/gtp5g-op"


class OwnershipStore:
    """PIDs this tool put on one API server: ``{"pid": "watch"|"manual"}`` in a JSON file.

    Read-modify-write under an flock on a side ``.lock`` file; written atomically (temp + rename).
    The file holds the API URL and PIDs only.
    """

    def __init__(self, api_url: str, state_dir: Path | None = None):
        self.api_url = api_url.rstrip("/")
        name = re.sub(r"[^A-Za-z0-9.]+", "_", re.sub(r"^https?://", "", self.api_url)).strip("_")
        self.path = (state_dir or default_state_dir()) / f"owned-{name}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self) -> dict[int, str]:
        try:
            doc = json.loads(self.path.read_text())
            return {int(pid): str(kind) for pid, kind in doc.get("pids", {}).items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError, TypeError):
            log.warning("ignoring unreadable ownership file %s", self.path)
            return {}

    def load(self) -> dict[int, str]:
        """PID → who pushed it."""
        with self._locked():
            return self._read()

    def owned(self, kind: str | None = None) -> set[int]:
        """PIDs of ``kind`` (all kinds when None)."""
        return {pid for pid, k in self.load().items() if kind is None or k == kind}

    def change(self, set_watch: Iterable[int] | None = None, add_manual: Iterable[int] = (), remove: Iterable[int] = ()) -> None:
        """Replace the watch-owned PIDs (if given), add manual PIDs, remove PIDs; one locked update."""
        with self._locked():
            pids = self._read()
            if set_watch is not None:
                pids = {p: k for p, k in pids.items() if k != WATCH}
                pids.update({p: WATCH for p in set_watch})
            pids.update({p: MANUAL for p in add_manual if pids.get(p) != WATCH})
            for pid in remove:
                pids.pop(pid, None)
            doc = {"api_url": self.api_url, "updated": time.time(), "pids": {str(p): k for p, k in sorted(pids.items())}}
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, self.path)
