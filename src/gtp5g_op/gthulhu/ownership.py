"""The legacy API's ownership file: which PIDs gtp5g-op put on one server.

The file lives in the hardened state directory (:mod:`gtp5g_op.ops.statedir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from gtp5g_op.ops.statedir import StateDir, StateDirError

log = logging.getLogger(__name__)

WATCH, MANUAL = "watch", "manual"  # who put a PID there: a running watch, or `strategies push`


class OwnershipStore:
    """PIDs this tool put on one API server: ``{"pid": "watch"|"manual"}`` in a JSON file.

    The file lives in the hardened state directory (``gtp5g_op.ops.statedir``): read-modify-write under
    the flock ``lock/store-<file>``, written atomically. It holds the API URL and PIDs only.
    """

    def __init__(self, api_url: str, state_dir: Path | StateDir | None = None):
        self.api_url = api_url.rstrip("/")
        name = re.sub(r"[^A-Za-z0-9.]+", "_", re.sub(r"^https?://", "", self.api_url)).strip("_.")
        if len(name) > 100:  # a file name has at most 255 bytes: keep it short and still unique
            name = f"{name[:80]}_{hashlib.sha256(self.api_url.encode()).hexdigest()[:16]}"
        self.dir = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
        self.filename = f"owned-{name or 'api'}.json"
        self.path = self.dir.path / self.filename

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self.dir.lock("store", self.filename):
            yield

    def _read(self) -> dict[int, str]:
        try:
            data = self.dir.read(self.filename)
            if data is None:
                return {}
            doc = json.loads(data)
            return {int(pid): str(kind) for pid, kind in doc.get("pids", {}).items()}
        except StateDirError as exc:
            log.warning("ignoring ownership file %s: %s", self.path, exc.one_line())
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

    def check_writable(self) -> None:
        """Rewrite the file under its lock, changing nothing: a state directory that cannot take a write
        (read-only, full, ...) raises StateDirError now, before the server is changed and the record lost."""
        self.change()

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
            self.dir.write(self.filename, (json.dumps(doc, indent=1) + "\n").encode())
