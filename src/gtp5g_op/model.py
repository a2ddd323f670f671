"""Plain data shared by the parser, the process tracker, the validator and the strategy pusher."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Target:
    """A thread the scheduler should favour: ``pid`` is the thread id, ``tgid`` its process."""

    pid: int
    tgid: int | None
    comm: str


@dataclass(slots=True)
class ProcessRecord:
    """What the trace told us about one subject, summed over its events."""

    pid: int
    tgid: int | None
    comm: str
    events: int = 0
    first_seen: float | None = None  # None for a thread no trace line named yet
    last_seen: float | None = None
    hooks: set[str] = field(default_factory=set)
    # Filled in by validation (None while unvalidated or with --no-validate).
    valid: bool | None = None
    reason: str = ""
    reason_code: str = ""  # the validator's short code (dead, comm, exe, ...)
    create_time: float | None = None
    from_threads: bool = False  # added because its process is a target, not seen in the trace
    exited: bool = False  # was valid, has exited since: kept for the report, no longer a target

    def as_json(self) -> dict:
        """The record as it appears in ``--json`` output."""
        return {
            "pid": self.pid,
            "tgid": self.tgid,
            "comm": self.comm,
            "events": self.events,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "hooks": sorted(self.hooks),
        }


OK, FAIL, WARN, UNKNOWN = "ok", "fail", "warn", "unknown"


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness check (doctor, build preflight): what was found and, when not ok, the fix."""

    name: str
    status: str  # OK | FAIL | WARN | UNKNOWN
    detail: str
    fix: str = ""
    required: bool = True

    @classmethod
    def passed_if(cls, name: str, passed: bool, detail: str, fix: str = "", required: bool = True) -> Check:
        """OK when ``passed``, else FAIL."""
        return cls(name, OK if passed else FAIL, detail, fix, required)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "ok": self.ok, "detail": self.detail,
                "fix": self.fix, "required": self.required}
