"""Reading a node's Gthulhu v1.x Decision Maker: which PIDs it really boosts under gtp5g-op's policies.

The Decision Maker (a sidecar of the scheduler on every node) answers ``GET
/api/v1/scheduling/strategies`` with what the scheduler applies on that node, every node policy
already resolved to PIDs by matching its ``commandRegex`` against ``/proc/<pid>/comm``; entries keep
the ``command_regex`` they came from. Its token comes from the same public-key call as the legacy
API's, so the legacy client reads it. gtp5g-op never writes to a Decision Maker: the Manager
overwrites whatever is posted there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gtp5g_op.gthulhu.legacy import GthulhuClient


class DecisionMakerReader:
    """``boosted(regexes)``: PID → regex for the Decision Maker's entries under those regexes that boost."""

    def __init__(self, client: GthulhuClient):
        self.client = client
        self.api_url = client.api_url

    def entries(self) -> list[dict]:
        """The Decision Maker's resolved list (checked like the legacy list)."""
        return self.client.list_strategies()

    def boosted(self, regexes: Iterable[str]) -> dict[int, str]:
        wanted = set(regexes)
        return {e["pid"]: e["command_regex"] for e in self.entries() if _boosts(e) and e.get("command_regex") in wanted}

    def close(self) -> None:
        self.client.close()


def _boosts(entry: dict[str, Any]) -> bool:
    """A v1.x entry boosts when its int priority is > 0 (a legacy-style ``true`` counts too)."""
    priority = entry.get("priority")
    return bool(entry.get("pid")) and (priority is True or (type(priority) is int and priority > 0))
