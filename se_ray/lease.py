"""One writer per output: a lease object beside ``labels/``, and the output-location check.

``OUTPUT/_lease.json`` holds the owner's host, pid, start time, heartbeat time and a
random token. It is created atomically where the store allows it:

* local or shared filesystem: the record is written to a temporary file, then hard-linked
  to the lease name (``link`` fails if the name exists, and a reader never sees a
  half-written record);
* S3 (through boto3): a conditional put, ``If-None-Match: *``; heartbeats and stale
  takeovers are puts with ``If-Match: <etag>`` so that only one of two racers wins. Without
  boto3 an S3 lease is refused unless ``storage.s3_lease_without_boto3`` accepts the next way;
* any other pyarrow filesystem: written, then read back after a short pause to detect a
  race (the later writer wins, the other one sees a foreign token and refuses).

A second acquirer refuses with one line naming the owner, unless the lease is stale (no
heartbeat for ``stale_s``, or an owner on this host whose process is gone) or ``force``.
Leases are re-entrant within a process: the CLI and the job function it calls may both
take the lease on the same output.

Every commit of output (``se_ray.storage``'s atomic writes, a folder cleared or published)
first calls ``check_leases()``: it reads each lease this process holds, or adopted from the
driver (``held_claims`` / ``adopted``: a Tune trial's process), and raises ``LeaseLostError``
when another run's record is there, so a run whose lease was taken commits nothing more.
"""

from __future__ import annotations

import logging
import os
import posixpath
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from se_ray.lease_records import (
    LeaseRecord,
    current_holder,
    held_message,
    lost_message,
    lost_reason,
    stale_reason,
)
from se_ray.lease_stores import LeaseStore, store_for
from se_ray.storage import absolute, filesystem, is_uri, on_commit

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
                holder = current_holder(self._store) if version is None else None
            except Exception as e:  # a transient store error: the next beat tries again
                logger.warning("lease heartbeat on %s failed: %s", self.location, e)
                continue
            if version is not None:
                self._version, self.record = version, beat
            elif holder is not None and holder[0].token == self.record.token:
                self._version = holder[1]  # still ours (a racer put it back): beat again next time
            else:
                self.lost = lost_message(self.location, holder[0] if holder else None)
                logger.warning("%s (found by the heartbeat)", self.lost)
                return

    def check(self) -> None:
        """Raise ``LeaseLostError`` when another run took this lease over (called before commits).

        Reads the lease store, so a takeover is seen at the first commit after it, not only at
        the next heartbeat; a store that cannot be read leaves the verdict to the heartbeat."""
        lease = self._outer or self
        if lease.lost is None and lease.record is not None and lease._store is not None:
            try:
                lease.lost = lost_reason(lease._store, lease.location, lease.record.token)
            except Exception as e:
                logger.warning("could not read the lease on %s before a commit: %s", lease.location, e)
        if lease.lost:
            raise LeaseLostError(lease.lost)

    def claim(self) -> LeaseClaim:
        """What another process needs to check this lease before its own commits."""
        lease = self._outer or self
        if lease.record is None:
            raise RuntimeError(f"the lease on {self.location} is not held")
        return LeaseClaim(absolute(lease.location), lease.storage, lease.record.token)

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


class LeaseClaim:
    """A lease held by another process of this run (the driver), checked from this one: it
    pickles as (output, storage, token), so it travels to a Tune trial's process."""

    def __init__(self, location: str, storage: StorageConfig | None, token: str):
        self.location, self.storage, self.token = location, storage, token
        self.lost: str | None = None
        self._store: LeaseStore | None = None

    def __reduce__(self):
        return (LeaseClaim, (self.location, self.storage, self.token))

    def check(self) -> None:
        if self.lost is None:
            self._store = self._store or store_for(self.location, self.storage)
            try:
                self.lost = lost_reason(self._store, self.location, self.token)
            except Exception as e:
                logger.warning("could not read the lease on %s before a commit: %s", self.location, e)
        if self.lost:
            raise LeaseLostError(self.lost)


_ADOPTED: list[LeaseClaim] = []


def check_leases() -> None:
    """Raise ``LeaseLostError`` if a lease this process holds or adopted was taken over.

    Every commit of output calls it first; with no lease in the process it does nothing."""
    with _HELD_LOCK:
        leases: list[OutputLease | LeaseClaim] = [*_HELD.values(), *_ADOPTED]
    for lease in leases:
        lease.check()


on_commit(check_leases)  # storage's commits check the leases (it cannot import this module)


def held_claims() -> list[LeaseClaim]:
    """The leases this process holds, to hand to the processes that commit for it."""
    with _HELD_LOCK:
        held = list(_HELD.values())
    return [lease.claim() for lease in held if lease.record is not None]


@contextmanager
def adopted(claims: Sequence[LeaseClaim]) -> Iterator[None]:
    """Check ``claims`` before every commit this process makes while inside."""
    with _HELD_LOCK:
        _ADOPTED.extend(claims)
    try:
        yield
    finally:
        with _HELD_LOCK:
            for claim in claims:
                _ADOPTED.remove(claim)


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
