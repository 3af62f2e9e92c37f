"""One writer per output: a lease object beside ``labels/``, and the output-location check.

``OUTPUT/_lease.json`` holds the owner's host, pid, start time, heartbeat time and a
random token. It is created atomically where the store allows it:

* local or shared filesystem: the record is written to a temporary file, then hard-linked
  to the lease name (``link`` fails if the name exists, and a reader never sees a
  half-written record);
* S3 (boto3 importable): a conditional put, ``If-None-Match: *``; heartbeats and stale
  takeovers are puts with ``If-Match: <etag>`` so that only one of two racers wins;
* any other pyarrow filesystem: written, then read back after a short pause to detect a
  race (the later writer wins, the other one sees a foreign token and refuses).

A second acquirer refuses with one line naming the owner, unless the lease is stale (no
heartbeat for ``stale_s``, or an owner on this host whose process is gone) or ``force``.
Leases are re-entrant within a process: the CLI and the job function it calls may both
take the lease on the same output.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from se_ray.lease_stores import LeaseStore, store_for
from se_ray.storage import filesystem, is_uri

if TYPE_CHECKING:
    from se_ray.config import StorageConfig

logger = logging.getLogger(__name__)

DEFAULT_STALE_S = 120.0


class OutputError(RuntimeError):
    """The output location cannot be used (a file, not writable, a missing bucket). One line."""


class LeaseHeldError(RuntimeError):
    """Another live run holds the lease on this output. One line naming the owner."""


class LeaseLostError(RuntimeError):
    """This run's lease was taken over (it looked stale to another run, or was forced)."""


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


def default_heartbeat_s(stale_s: float) -> float:
    # Four heartbeats per stale period: one slow write or a GC pause does not lose the lease.
    return max(0.05, min(30.0, stale_s / 4))


# ---------------------------------------------------------------------------------------

_HELD: dict[str, OutputLease] = {}
_HELD_LOCK = threading.Lock()


class OutputLease:
    """The lease on one output; a context manager. ``check()`` raises if it was lost.

    ``stale_s`` is the config's ``storage.lease_stale_s``; ``force`` takes the lease from a
    live owner (``--force``). ``command`` is recorded for whoever finds the lease.
    """

    def __init__(
        self,
        location: str,
        storage: StorageConfig | None = None,
        *,
        stale_s: float = DEFAULT_STALE_S,
        heartbeat_s: float | None = None,
        force: bool = False,
        command: str = "",
        reentrant: bool = True,
    ):
        self.location = location
        self.storage = storage
        self.stale_s = float(stale_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else default_heartbeat_s(self.stale_s)
        self.force = force
        self.command = command
        self.reentrant = reentrant
        self.host = socket.gethostname()
        self.record: LeaseRecord | None = None
        self.lost: str | None = None
        self._store: LeaseStore | None = None
        self._version: str | None = None
        self._key: str | None = None
        self._outer: OutputLease | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.record is not None or self._outer is not None

    def acquire(self) -> OutputLease:
        try:
            return self._acquire()
        except (LeaseHeldError, OutputError):
            raise
        except Exception as e:  # the store failed (permissions, network): one line, not a traceback
            raise OutputError(f"output {self.location}: could not take its lease: {_one_line(e)}") from e

    def _acquire(self) -> OutputLease:
        store = store_for(self.location, self.storage)
        self._key = store.where
        with _HELD_LOCK:
            outer = _HELD.get(self._key) if self.reentrant else None
            if outer is not None:
                self._outer = outer  # this process already holds it: nested use
                return self
        now = time.time()
        record = LeaseRecord(self.host, os.getpid(), now, now, secrets.token_hex(16), self.command)
        data = record.to_bytes()
        for _ in range(5):
            version = store.create(data)
            if version is not None:
                break
            current = store.read()
            if current is None:
                continue  # released between our create and read: try again
            theirs = LeaseRecord.from_bytes(current[0], fallback_time=store.mtime())
            reason = "forced" if self.force else stale_reason(theirs, time.time(), self.stale_s, self.host)
            if reason is None:
                raise LeaseHeldError(held_message(self.location, theirs, time.time(), self.stale_s))
            logger.warning("taking over the lease on %s from %s: %s", self.location, theirs.owner, reason)
            version = store.take_over(data, current[1])
            if version is not None:
                break
        else:
            raise LeaseHeldError(f"output {self.location}: its lease kept changing hands; try again")
        self._store, self._version, self.record = store, version, record
        with _HELD_LOCK:
            _HELD.setdefault(self._key, self)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="se-ray-lease", daemon=True)
        self._thread.start()
        logger.debug("leased %s (%s)", self.location, store.where)
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            assert self._store is not None and self.record is not None and self._version is not None
            beat = LeaseRecord(**{**asdict(self.record), "heartbeat_at": time.time()})
            try:
                version = self._store.replace(beat.to_bytes(), self._version)
            except Exception as e:  # a transient store error: the next beat tries again
                logger.warning("lease heartbeat on %s failed: %s", self.location, e)
                continue
            if version is None:
                current = self._store.read()
                owner = (
                    LeaseRecord.from_bytes(current[0], time.time()).owner if current else "nobody (deleted)"
                )
                self.lost = f"the lease on {self.location} was taken over by {owner}"
                logger.error("%s; this run no longer writes alone", self.lost)
                return
            self._version, self.record = version, beat

    def check(self) -> None:
        """Raise ``LeaseLostError`` when another run took this lease over (call before commits)."""
        lease = self._outer or self
        if lease.lost:
            raise LeaseLostError(lease.lost)

    def release(self) -> None:
        if self._outer is not None:
            self._outer = None
            return
        if self.record is None or self._store is None:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with _HELD_LOCK:
            if _HELD.get(self._key or "") is self:
                del _HELD[self._key or ""]
        try:
            if self.lost is None and self._version is not None and not self._store.delete(self._version):
                logger.warning("lease on %s changed hands: left in place", self.location)
        except Exception as e:  # it goes stale on its own; the output itself is intact
            logger.warning("could not release the lease on %s: %s", self.location, e)
        self.record = None

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_output_location(location: str, storage: StorageConfig | None = None) -> tuple[Any, str]:
    """Create the output folder and prove it writable; ``(fs, path)``, or ``OutputError`` in one line.

    Runs before any heavy start (Ray, engines), so a bad ``--output`` fails in a second.
    """
    import pyarrow.fs as pafs

    try:
        fs, path = filesystem(location, storage)
        info = fs.get_file_info(path)
    except (OSError, ValueError) as e:
        raise OutputError(f"output {location} cannot be used: {_one_line(e)}") from None
    if info.type == pafs.FileType.File:
        raise OutputError(f"output {location} is an existing file; give a folder")
    probe = (os.path.join if not is_uri(location) else posixpath.join)(
        path, f".se-ray-probe-{uuid.uuid4().hex}"
    )
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(b"probe")
        fs.delete_file(probe)
    except (OSError, ValueError) as e:
        raise OutputError(f"output {location} is not writable: {_one_line(e)}") from None
    return fs, path


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
