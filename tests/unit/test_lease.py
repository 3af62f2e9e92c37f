"""The output lease on a local filesystem: one writer per output, stale takeover, force, release."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from se_ray.lease import (
    LeaseHeldError,
    LeaseLostError,
    LeaseRecord,
    OutputError,
    OutputLease,
    check_output_location,
    default_heartbeat_s,
    held_message,
    stale_reason,
)
from se_ray.lease_stores import LEASE_FILE, GenericStore

HOST = socket.gethostname()


def _record(**kw) -> LeaseRecord:
    base = dict(host="node-a", pid=4242, started_at=1000.0, heartbeat_at=1000.0, token="t" * 32)
    return LeaseRecord(**{**base, **kw})


def _write_lease(out: Path, record: LeaseRecord) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LEASE_FILE).write_bytes(record.to_bytes())


def _on_disk(out: Path) -> dict:
    return json.loads((out / LEASE_FILE).read_text())


# -- pure parts ------------------------------------------------------------------------


def test_stale_reason_by_heartbeat_age():
    rec = _record(heartbeat_at=1000.0)
    assert stale_reason(rec, now=1100.0, stale_s=120, this_host=HOST) is None
    assert stale_reason(rec, now=1120.0, stale_s=120, this_host=HOST) is None
    assert "no heartbeat for 121 s" in stale_reason(rec, now=1121.0, stale_s=120, this_host=HOST)


def test_stale_reason_dead_owner_on_this_host():
    rec = _record(host=HOST, heartbeat_at=1000.0)
    assert stale_reason(rec, 1001.0, 120, HOST, alive=lambda pid: True) is None
    assert (
        stale_reason(rec, 1001.0, 120, HOST, alive=lambda pid: False) == "process 4242 on this host is gone"
    )
    # Another host's pid says nothing about this one.
    assert stale_reason(_record(host="elsewhere"), 1001.0, 120, HOST, alive=lambda pid: False) is None


def test_held_message_is_one_line_naming_the_owner():
    msg = held_message("s3://b/run1", _record(heartbeat_at=1000.0), now=1003.4, stale_s=120)
    assert msg == (
        "output s3://b/run1 is leased by node-a:4242 since 1970-01-01 00:16:40 UTC; heartbeat 3 s ago "
        "(use --force or wait for it to go stale after 120 s)"
    )
    assert "\n" not in msg


def test_record_round_trip_and_unreadable_lease():
    rec = _record(command="se-ray label")
    assert LeaseRecord.from_bytes(rec.to_bytes(), fallback_time=0) == rec
    broken = LeaseRecord.from_bytes(b'{"host": "x"', fallback_time=77.0)
    assert (broken.owner, broken.heartbeat_at, broken.token) == ("?:0", 77.0, "")


def test_default_heartbeat_is_a_quarter_of_the_stale_time_at_most_30_s():
    assert default_heartbeat_s(120) == 30
    assert default_heartbeat_s(20) == 5
    assert default_heartbeat_s(3600) == 30


# -- local filesystem ------------------------------------------------------------------


def test_acquire_writes_owner_and_release_deletes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with OutputLease(str(out), command="se-ray label") as lease:
        on_disk = _on_disk(out)
        assert (on_disk["host"], on_disk["pid"], on_disk["command"]) == (HOST, os.getpid(), "se-ray label")
        assert on_disk["token"] == lease.record.token and len(on_disk["token"]) == 32
        assert on_disk["started_at"] == on_disk["heartbeat_at"]
        assert not [p for p in out.iterdir() if p.name != LEASE_FILE]  # no temporaries left
    assert not (out / LEASE_FILE).exists()


def test_second_acquirer_refuses_with_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    first = OutputLease(str(out), reentrant=False).acquire()
    try:
        with pytest.raises(LeaseHeldError) as err:
            OutputLease(str(out), reentrant=False).acquire()
        msg = str(err.value)
        assert msg.startswith(f"output {out} is leased by {HOST}:{os.getpid()} since ")
        assert "heartbeat 0 s ago (use --force or wait for it to go stale after 120 s)" in msg
        assert _on_disk(out)["token"] == first.record.token  # the holder's lease is untouched
    finally:
        first.release()
    with OutputLease(str(out), reentrant=False):  # free again once released
        pass


def test_leases_are_reentrant_within_a_process(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with OutputLease(str(out)) as outer:
        with OutputLease(str(out)) as inner:  # the CLI holds it and the job takes it again
            assert inner.held
        assert _on_disk(out)["token"] == outer.record.token  # the inner release left it
    assert not (out / LEASE_FILE).exists()


def test_stale_lease_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    _write_lease(out, _record(host="gone-node", heartbeat_at=time.time() - 300))
    with OutputLease(str(out), stale_s=120) as lease:
        assert _on_disk(out)["token"] == lease.record.token
    assert "taking over the lease" in caplog.text and "gone-node:4242" in caplog.text
    assert "no heartbeat for 300 s" in caplog.text


def test_fresh_foreign_lease_is_refused_until_forced(tmp_path):
    out = tmp_path / "run"
    _write_lease(out, _record(host="other-node", heartbeat_at=time.time() - 5))
    with pytest.raises(LeaseHeldError, match=r"leased by other-node:4242 .* heartbeat 5 s ago"):
        OutputLease(str(out)).acquire()
    with OutputLease(str(out), force=True) as lease:
        assert _on_disk(out)["host"] == HOST and _on_disk(out)["token"] == lease.record.token


def test_unreadable_lease_counts_by_its_mtime(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LEASE_FILE).write_text("{half a rec")
    with pytest.raises(LeaseHeldError, match=r"leased by \?:0"):
        OutputLease(str(out)).acquire()
    old = time.time() - 1000
    os.utime(out / LEASE_FILE, (old, old))
    with OutputLease(str(out)):
        pass


def test_release_only_deletes_its_own_token(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lease = OutputLease(str(out), heartbeat_s=3600).acquire()
    foreign = _record(host="other-node", heartbeat_at=time.time())
    (out / LEASE_FILE).write_bytes(foreign.to_bytes())  # forced over by another run meanwhile
    lease.release()
    assert _on_disk(out)["token"] == foreign.token


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lease = OutputLease(str(out), heartbeat_s=0.05).acquire()
    try:
        first = _on_disk(out)["heartbeat_at"]
        deadline = time.time() + 10
        while _on_disk(out)["heartbeat_at"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert _on_disk(out)["heartbeat_at"] > first
        assert _on_disk(out)["started_at"] == lease.record.started_at
        lease.check()
        (out / LEASE_FILE).write_bytes(_record(host="other-node", heartbeat_at=time.time()).to_bytes())
        while lease.lost is None and time.time() < deadline:
            time.sleep(0.02)
        with pytest.raises(LeaseLostError, match="taken over by other-node:4242"):
            lease.check()
    finally:
        lease.release()
    assert _on_disk(out)["host"] == "other-node"  # a lost lease is not deleted on release


def test_concurrent_acquirers_exactly_one_wins(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    n = 8
    barrier = threading.Barrier(n)
    won: list[OutputLease] = []
    refused: list[str] = []

    def attempt() -> None:
        lease = OutputLease(str(out), reentrant=False, heartbeat_s=3600)
        barrier.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeldError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=attempt) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == n - 1
    assert _on_disk(out)["token"] == won[0].record.token
    won[0].release()


_HOLDER = """
import sys, time
from se_ray.lease import OutputLease
lease = OutputLease(sys.argv[1], stale_s=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(out: Path, stale_s: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out), str(stale_s)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_another_process_holds_it_until_it_dies(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = _holder(out)
    try:
        with pytest.raises(LeaseHeldError, match=f"leased by {HOST}:{holder.pid} since"):
            OutputLease(str(out)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 left the lease behind; its owner is gone from this host, so it is stale at once.
    assert _on_disk(out)["pid"] == holder.pid
    with OutputLease(str(out)) as lease:
        assert _on_disk(out)["token"] == lease.record.token


def test_generic_store_write_then_read_back(tmp_path):
    import pyarrow.fs as pafs

    path = str(tmp_path / LEASE_FILE)
    store = GenericStore(pafs.LocalFileSystem(), path, settle_s=0)
    assert store.read() is None
    v1 = store.create(b"one")
    assert v1 is not None and store.create(b"two") is None
    assert store.replace(b"three", "stale-version") is None
    v3 = store.replace(b"three", v1)
    assert store.read() == (b"three", v3)
    assert not store.delete(v1)
    assert store.delete(v3) and store.read() is None


# -- output location -------------------------------------------------------------------


def test_output_that_is_a_file(tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("x")
    with pytest.raises(OutputError, match=f"^output {f} is an existing file; give a folder$"):
        check_output_location(str(f))


def test_output_below_a_file_is_not_writable(tmp_path):
    # chmod does not stop root (the tests' user): a path below a file fails for everyone.
    with pytest.raises(OutputError, match=r"^output /etc/passwd/run is not writable: "):
        check_output_location("/etc/passwd/run")


def test_output_folder_is_created_and_left_clean(tmp_path):
    out = tmp_path / "a" / "b"
    fs, path = check_output_location(str(out))
    assert path == str(out) and out.is_dir() and list(out.iterdir()) == []
