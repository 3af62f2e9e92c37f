"""The lease record in ``OUTPUT/_lease.json`` and what a run reads from it: whether a lease may
be taken over, and whether it is still this run's. Pure but for ``pid_alive`` and the store reads."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from se_ray.lease_stores import LeaseStore

# A local takeover attempt moves the lease aside for a moment (``LocalStore._claim``): a reader
# that finds no lease looks once more after this pause before calling it gone.
_REREAD_S = 0.2
_STOPPED = "this run stopped before its next commit"


@dataclass(frozen=True)
class LeaseRecord:
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    token: str
    command: str = ""

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, fallback_time: float) -> LeaseRecord:
        """Parse a lease; an unreadable one (half-written by a foreign tool) gets ``fallback_time``."""
        try:
            raw = json.loads(data.decode())
            return cls(
                host=str(raw["host"]),
                pid=int(raw["pid"]),
                started_at=float(raw["started_at"]),
                heartbeat_at=float(raw["heartbeat_at"]),
                token=str(raw["token"]),
                command=str(raw.get("command", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls("?", 0, fallback_time, fallback_time, "", "unreadable lease")

    @property
    def owner(self) -> str:
        return f"{self.host}:{self.pid}"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def stale_reason(
    record: LeaseRecord,
    now: float,
    stale_s: float,
    this_host: str,
    alive: Callable[[int], bool] = pid_alive,
) -> str | None:
    """Why ``record`` may be taken over, or None while its owner counts as live."""
    age = now - record.heartbeat_at
    if age > stale_s:
        return f"no heartbeat for {age:.0f} s (stale after {stale_s:.0f} s)"
    if record.host == this_host and not alive(record.pid):
        return f"process {record.pid} on this host is gone"
    return None


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def held_message(output: str, record: LeaseRecord, now: float, stale_s: float) -> str:
    age = max(0.0, now - record.heartbeat_at)
    return (
        f"output {output} is leased by {record.owner} since {_utc(record.started_at)}; "
        f"heartbeat {age:.0f} s ago (use --force or wait for it to go stale after {stale_s:.0f} s)"
    )


def lost_message(output: str, holder: LeaseRecord | None) -> str:
    """The one line a run that lost its lease stops with: the output and who holds it now."""
    if holder is None:
        return f"output {output}: its lease was deleted by another run or by hand; {_STOPPED}"
    since = _utc(holder.started_at)
    return f"output {output} was taken over by {holder.owner} (leased since {since}); {_STOPPED}"


def current_holder(store: LeaseStore) -> tuple[LeaseRecord, str] | None:
    """The record in ``store`` and its version, or None when there is none (read twice to be sure)."""
    current = store.read()
    if current is None:
        time.sleep(_REREAD_S)
        current = store.read()
    if current is None:
        return None
    return LeaseRecord.from_bytes(current[0], fallback_time=time.time()), current[1]


def lost_reason(store: LeaseStore, output: str, token: str) -> str | None:
    """Why the lease with ``token`` is no longer this run's, or None while it still is."""
    holder = current_holder(store)
    if holder is not None and holder[0].token == token:
        return None
    return lost_message(output, holder[0] if holder else None)
