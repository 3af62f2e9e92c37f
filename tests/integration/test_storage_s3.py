"""Object storage for real: the S3 code path users hit, against moto's S3 server.

moto runs in server mode (a real HTTP endpoint on a free localhost port), so everything
below goes through pyarrow's ``S3FileSystem`` exactly as ``--output s3://...`` does on a
cluster: ``se_ray.storage.filesystem`` with ``storage.s3_endpoint_override`` /
``storage.s3_scheme`` / ``storage.s3_region``, credentials from the standard AWS
environment variables. boto3 (a second, independent client) creates the buckets and
checks what actually landed in them.

* atomic writes (hidden temporary key, then pyarrow's copy+delete ``move``), listing that
  skips in-flight parts, reading a folder of parts back, JSON;
* loading questions from ``s3://`` JSONL and Parquet;
* slow: a real ``se-ray label --input s3://... --output s3://...`` run on the session
  cluster and engine, then a rerun that finds everything labeled and does no model work.
"""

from __future__ import annotations

import io
import json
import logging
import uuid

import pytest

from se_ray.config import DataConfig, StorageConfig
from tests.conftest import ENGINE_OVERRIDES, REPO, run_cli

DEMO = REPO / "se_ray" / "demo" / "nq_open_demo.jsonl"
REGION = "us-east-1"


@pytest.fixture(scope="module")
def s3_endpoint():
    """``http://127.0.0.1:PORT`` of a moto S3 server running in a thread of this process."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch):
    """Credentials the way users pass them (moto accepts any); nothing from ~/.aws or IMDS."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "se-ray-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "se-ray-test-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def s3(s3_endpoint, aws_env):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=REGION,
        aws_access_key_id="se-ray-test-key",
        aws_secret_access_key="se-ray-test-secret",
    )


@pytest.fixture
def bucket(s3) -> str:
    name = f"se-ray-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def storage(s3_endpoint) -> StorageConfig:
    return StorageConfig(s3_endpoint_override=s3_endpoint, s3_scheme="http", s3_region=REGION)


def _keys(s3, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _get(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _base_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _read_parquet_bytes(data: bytes):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data))


def test_filesystem_is_pyarrow_s3(bucket, storage):
    import pyarrow.fs as pafs

    from se_ray.storage import filesystem, is_uri, join

    fs, path = filesystem(f"s3://{bucket}/run1/", storage)
    assert isinstance(fs, pafs.S3FileSystem)
    assert fs.region == REGION
    assert path == f"{bucket}/run1"
    assert is_uri(f"s3://{bucket}/run1")
    assert join(f"s3://{bucket}/run1", "labels", "x.parquet") == f"s3://{bucket}/run1/labels/x.parquet"


def test_atomic_parquet_list_read_and_json(s3, bucket, storage):
    import pyarrow as pa

    from se_ray.storage import (
        exists,
        filesystem,
        join,
        list_parquet,
        read_parquet_folder,
        read_text,
        write_json,
        write_parquet_atomic,
    )

    fs, out = filesystem(f"s3://{bucket}/run1", storage)
    labels = join(out, "labels")
    assert list_parquet(fs, labels) == []  # a folder that does not exist yet
    assert read_parquet_folder(fs, labels) is None

    write_parquet_atomic(fs, join(labels, "part-a.parquet"), pa.table({"id": ["q1", "q2"], "x": [1, 2]}))
    write_parquet_atomic(fs, join(labels, "part-b.parquet"), pa.table({"id": ["q3"], "x": [3]}))
    # Re-committing a part (a rerun of the same batch) replaces it as a whole.
    write_parquet_atomic(fs, join(labels, "part-b.parquet"), pa.table({"id": ["q3"], "x": [30]}))
    # Parts still in flight, as a crashed writer leaves them: never listed, never read.
    s3.put_object(Bucket=bucket, Key="run1/labels/.part-c.parquet.0123.tmp", Body=b"half a part")
    s3.put_object(Bucket=bucket, Key="run1/labels/_part-d.parquet", Body=b"half a part")
    s3.put_object(Bucket=bucket, Key="run1/labels/notes.txt", Body=b"not a part")

    assert list_parquet(fs, labels) == [join(labels, "part-a.parquet"), join(labels, "part-b.parquet")]
    table = read_parquet_folder(fs, labels)
    assert sorted(zip(table.column("id").to_pylist(), table.column("x").to_pylist(), strict=True)) == [
        ("q1", 1),
        ("q2", 2),
        ("q3", 30),
    ]
    assert read_parquet_folder(fs, labels, columns=["id"]).column_names == ["id"]

    write_json(fs, join(out, "summary.json"), {"b": 2, "a": [1, "x"]})
    assert json.loads(read_text(fs, join(out, "summary.json"))) == {"a": [1, "x"], "b": 2}
    assert exists(fs, join(out, "summary.json"))
    assert not exists(fs, join(out, "missing.json"))

    # What landed in the bucket, seen by an independent client: the committed objects and
    # the in-flight ones put above; none of the writer's own hidden temporaries survive.
    files = [k for k in _keys(s3, bucket) if not k.endswith("/")]  # pyarrow's folder markers aside
    assert files == [
        "run1/labels/.part-c.parquet.0123.tmp",
        "run1/labels/_part-d.parquet",
        "run1/labels/notes.txt",
        "run1/labels/part-a.parquet",
        "run1/labels/part-b.parquet",
        "run1/summary.json",
    ]
    assert _read_parquet_bytes(_get(s3, bucket, "run1/labels/part-b.parquet")).column("x").to_pylist() == [30]
    assert json.loads(_get(s3, bucket, "run1/summary.json")) == {"a": [1, "x"], "b": 2}


def test_missing_bucket_is_a_clear_error(storage):
    from se_ray.storage import filesystem, join, write_json

    fs, out = filesystem(f"s3://se-ray-no-such-bucket-{uuid.uuid4().hex[:8]}/run1", storage)
    with pytest.raises(OSError, match="not found"):
        write_json(fs, join(out, "summary.json"), {})


def test_load_questions_from_s3_jsonl_and_parquet(s3, bucket, storage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from se_ray.data import InputError, load_questions, stable_id

    lines = [
        json.dumps({"question": "who wrote hamlet", "answer": ["Shakespeare"]}),
        "{not json",
        json.dumps({"id": "q-2", "question": "capital of france", "answer": "Paris"}),
        json.dumps({"id": "q-2", "question": "a duplicate id"}),
        json.dumps({"answer": ["no question"]}),
        json.dumps({"id": 7, "question": "  2 + 2  ", "context": "arithmetic"}),
    ]
    s3.put_object(Bucket=bucket, Key="in/questions.jsonl", Body=("\n".join(lines) + "\n").encode())

    loaded = load_questions(f"s3://{bucket}/in/questions.jsonl", DataConfig(), storage)
    assert [r["id"] for r in loaded.rows] == [stable_id("who wrote hamlet"), "q-2", "7"]
    assert loaded.rows[0]["references"] == ["Shakespeare"]
    assert loaded.rows[1]["references"] == ["Paris"]
    assert loaded.rows[2]["question"] == "2 + 2"
    assert loaded.rows[2]["context"] == "arithmetic"
    assert [(r["line"], r["reason"].split(":")[0]) for r in loaded.rejects] == [
        (2, "not valid JSON"),
        (4, "duplicate id 'q-2'"),
        (5, "missing field 'question'"),
    ]
    assert all(r["source"] == f"s3://{bucket}/in/questions.jsonl" for r in loaded.rejects)

    limited = load_questions(f"s3://{bucket}/in/questions.jsonl", DataConfig(limit=2), storage)
    assert [r["id"] for r in limited.rows] == [stable_id("who wrote hamlet"), "q-2"]

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["p1", "p2"], "question": ["first?", "second?"]}), sink)
    s3.put_object(Bucket=bucket, Key="in/questions.parquet", Body=sink.getvalue().to_pybytes())
    from_parquet = load_questions(f"s3://{bucket}/in/questions.parquet", DataConfig(), storage)
    assert [(r["id"], r["question"]) for r in from_parquet.rows] == [("p1", "first?"), ("p2", "second?")]

    with pytest.raises(InputError, match="does not exist"):
        load_questions(f"s3://{bucket}/in/missing.jsonl", DataConfig(), storage)


def _demo_questions(n: int) -> list[dict]:
    with DEMO.open() as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


@pytest.mark.slow
def test_label_cli_reads_and_writes_s3(engine, s3, bucket, s3_endpoint):
    """`se-ray label` from an s3:// JSONL into an s3:// run folder, then a rerun that resumes."""
    from se_ray.data import stable_id

    questions = _demo_questions(6)  # data.limit=4 keeps the first 4
    body = "".join(json.dumps(q) + "\n" for q in questions)
    s3.put_object(Bucket=bucket, Key="questions.jsonl", Body=body.encode())
    want_ids = sorted(stable_id(q["question"]) for q in questions[:4])

    args = [
        "label",
        "--input", f"s3://{bucket}/questions.jsonl",
        "--output", f"s3://{bucket}/run1",
        "--set", f"storage.s3_endpoint_override={s3_endpoint}",
        "--set", "storage.s3_scheme=http",
        "--set", f"storage.s3_region={REGION}",
        *(a for o in ENGINE_OVERRIDES for a in ("--set", o)),
        "--set", "data.limit=4",
        "--set", "sampling.num_samples=3",
        "--set", "sampling.max_tokens=12",
        "--set", "sampling.batch_size=2",
        "--set", "labeling.write_batch_size=2",
    ]  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-4000:]

    keys = _keys(s3, bucket, "run1/")
    assert not [k for k in keys if _base_name(k).startswith(".")], keys  # no temporaries left
    parts = [k for k in keys if k.startswith("run1/labels/part-") and k.endswith(".parquet")]
    assert len(parts) == 2, keys  # labeling.write_batch_size=2: two parts, each committed atomically
    for name in ("run1/config.yaml", "run1/rejects.jsonl", "run1/label_summary.json"):
        assert name in keys
    import pyarrow as pa

    labels = pa.concat_tables([_read_parquet_bytes(_get(s3, bucket, k)) for k in parts])
    ids = labels.column("id").to_pylist()
    assert sorted(ids) == want_ids  # every question exactly once
    assert labels.num_rows == 4
    for row in labels.to_pylist():
        assert len(row["samples"]) == 3
        assert row["semantic_entropy"] is not None and 0.0 <= row["semantic_entropy"] <= 1.0987
        assert row["target"] in (row["standard_answer"], "I don't know the answer.")
        assert row["abstain"] == (row["semantic_entropy"] > row["tau"])

    summary = json.loads(_get(s3, bucket, "run1/label_summary.json"))
    assert summary["labeled_now"] == 4
    assert summary["questions"] == 4
    assert summary["output"] == f"s3://{bucket}/run1"
    stdout_summary, _ = json.JSONDecoder().raw_decode(first.stdout[first.stdout.index('{\n  "input"') :])
    assert stdout_summary["labeled_now"] == 4

    etags = {k: s3.head_object(Bucket=bucket, Key=k)["ETag"] for k in parts}
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-4000:]
    rerun = json.loads(_get(s3, bucket, "run1/label_summary.json"))
    assert rerun["labeled_now"] == 0
    assert rerun["already_labeled"] == 4
    assert "engine_ready_s" not in rerun  # the pipeline (and its engine) never started
    assert {k: s3.head_object(Bucket=bucket, Key=k)["ETag"] for k in parts} == etags
    assert [k for k in _keys(s3, bucket, "run1/labels/") if not k.endswith("/")] == sorted(parts)


# -- the output lease on S3: conditional puts against the real HTTP server -------------------


def _lease_record(s3, bucket: str, key: str = "run1/_lease.json") -> dict:
    return json.loads(_get(s3, bucket, key))


def test_lease_on_s3_is_created_conditionally_and_refuses_a_second_run(s3, bucket, storage):
    import os

    from se_ray.lease import LeaseHeldError, OutputLease
    from se_ray.lease_stores import S3Store, store_for

    assert isinstance(store_for(f"s3://{bucket}/run1", storage), S3Store)  # not the read-back fallback
    out = f"s3://{bucket}/run1"
    first = OutputLease(out, storage, reentrant=False).acquire()
    try:
        assert _lease_record(s3, bucket)["pid"] == os.getpid()
        assert _lease_record(s3, bucket)["token"] == first.record.token
        with pytest.raises(
            LeaseHeldError, match=rf"^output {out} is leased by .*:{os.getpid()} since .*120 s\)$"
        ):
            OutputLease(out, storage, reentrant=False).acquire()
        assert _lease_record(s3, bucket)["token"] == first.record.token
    finally:
        first.release()
    assert "run1/_lease.json" not in _keys(s3, bucket)


def test_s3_conditional_put_lets_exactly_one_racer_win(s3, bucket, storage):
    import threading

    from se_ray.lease_stores import store_for

    stores = [store_for(f"s3://{bucket}/race", storage) for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    versions: list[str | None] = [None] * len(stores)

    def put(i: int) -> None:
        barrier.wait()
        versions[i] = stores[i].create(f"writer {i}".encode())

    threads = [threading.Thread(target=put, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, v in enumerate(versions) if v is not None]
    assert len(winners) == 1
    assert _get(s3, bucket, "race/_lease.json") == f"writer {winners[0]}".encode()
    # If-Match: a replace against an old ETag fails, against the current one succeeds.
    store = stores[0]
    assert store.replace(b"late", '"0123456789abcdef"') is None
    assert store.replace(b"next", versions[winners[0]]) is not None
    assert not store.delete(versions[winners[0]])  # the ETag moved on: not ours to delete


def test_s3_stale_lease_is_taken_over_and_force_takes_a_live_one(s3, bucket, storage):
    import time

    from se_ray.lease import LeaseHeldError, LeaseRecord, OutputLease

    out = f"s3://{bucket}/run1"
    stale = LeaseRecord("gone-node", 1, time.time() - 400, time.time() - 300, "a" * 32)
    s3.put_object(Bucket=bucket, Key="run1/_lease.json", Body=stale.to_bytes())
    with OutputLease(out, storage, stale_s=120) as lease:
        assert _lease_record(s3, bucket)["token"] == lease.record.token

    live = LeaseRecord("other-node", 7, time.time(), time.time(), "b" * 32)
    s3.put_object(Bucket=bucket, Key="run1/_lease.json", Body=live.to_bytes())
    with pytest.raises(LeaseHeldError, match="leased by other-node:7"):
        OutputLease(out, storage).acquire()
    with OutputLease(out, storage, force=True) as lease:
        assert _lease_record(s3, bucket)["token"] == lease.record.token
    assert "run1/_lease.json" not in _keys(s3, bucket)


def test_s3_heartbeat_and_release_keep_to_their_own_token(s3, bucket, storage):
    import time

    from se_ray.lease import LeaseLostError, LeaseRecord, OutputLease

    lease = OutputLease(f"s3://{bucket}/run1", storage, heartbeat_s=0.1).acquire()
    try:
        first = _lease_record(s3, bucket)["heartbeat_at"]
        deadline = time.time() + 20
        while _lease_record(s3, bucket)["heartbeat_at"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert _lease_record(s3, bucket)["heartbeat_at"] > first
        other = LeaseRecord("other-node", 7, time.time(), time.time(), "c" * 32)
        s3.put_object(Bucket=bucket, Key="run1/_lease.json", Body=other.to_bytes())  # forced by another run
        while lease.lost is None and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseLostError, match="other-node:7"):
            lease.check()
    finally:
        lease.release()
    assert _lease_record(s3, bucket)["token"] == "c" * 32  # the other run's lease stays


def test_s3_output_location_checks(s3, bucket, storage):
    from se_ray.lease import OutputError, check_output_location

    s3.put_object(Bucket=bucket, Key="a-file", Body=b"x")
    with pytest.raises(
        OutputError, match=rf"^output s3://{bucket}/a-file is an existing file; give a folder$"
    ):
        check_output_location(f"s3://{bucket}/a-file", storage)
    missing = f"s3://se-ray-no-such-bucket-{uuid.uuid4().hex[:8]}/run1"
    with pytest.raises(OutputError, match=rf"^output {missing} is not writable: "):
        check_output_location(missing, storage)
    check_output_location(f"s3://{bucket}/fresh/run", storage)
    assert not [k for k in _keys(s3, bucket, "fresh/") if "probe" in k]  # the probe is cleaned up


def test_s3_stage_state_missing_is_absent_and_unreadable_deletes_nothing(s3, bucket, storage):
    """Only S3's "no such key" means a stage is absent. An object S3 refuses to serve (here:
    archived to Glacier, GetObject answers InvalidObjectState) is an error, and the finished
    trial's checkpoint and adapter stay."""
    from se_ray.run.stages import STAGE_FILE, Stage
    from se_ray.storage import Store

    fresh = Stage(Store(f"s3://{bucket}/fresh", storage), "k")
    assert fresh.cached() is None
    fresh.begin()
    assert json.loads(_get(s3, bucket, f"fresh/{STAGE_FILE}")) == {"key": "k", "done": False}

    state = json.dumps({"key": "k", "done": True, "summary": {"aed": 0.4}}).encode()
    s3.put_object(Bucket=bucket, Key=f"trial/{STAGE_FILE}", Body=state, StorageClass="GLACIER")
    s3.put_object(Bucket=bucket, Key="trial/train/checkpoint_000003/model.safetensors", Body=b"w")
    s3.put_object(Bucket=bucket, Key="trial/adapter/adapter_model.safetensors", Body=b"lora")
    before = _keys(s3, bucket, "trial/")
    stage = Stage(Store(f"s3://{bucket}/trial", storage), "k")
    with pytest.raises(OSError) as err:
        stage.cached()
    assert not isinstance(err.value, FileNotFoundError)
    with pytest.raises(OSError):
        stage.begin()
    assert _keys(s3, bucket, "trial/") == before


def test_s3_commit_after_a_forced_takeover_raises_and_writes_nothing(s3, bucket, storage):
    from se_ray.lease import LeaseLostError, OutputLease
    from se_ray.storage import Store

    out = f"s3://{bucket}/run1"
    first = OutputLease(out, storage, heartbeat_s=3600).acquire()
    try:
        store = Store(out, storage)
        store.write_json("before.json", {"n": 1})
        second = OutputLease(out, storage, force=True, reentrant=False).acquire()
        try:
            with pytest.raises(LeaseLostError, match=rf"^output {out} was taken over by .*:\d+ \(leased"):
                store.write_json("after.json", {"n": 2})
            objects = sorted(k for k in _keys(s3, bucket, "run1/") if not k.endswith("/"))  # no dir markers
            assert objects == ["run1/_lease.json", "run1/before.json"]  # no after.json, no temporary
            assert _lease_record(s3, bucket)["token"] == second.record.token
        finally:
            second.release()
    finally:
        first.release()


def test_s3_lease_without_boto3_only_when_opted_in(s3, bucket, storage, monkeypatch):
    import sys

    from se_ray.lease import OutputError, OutputLease
    from se_ray.lease_stores import GenericStore, store_for

    monkeypatch.setitem(sys.modules, "boto3", None)  # as on a node without boto3
    out = f"s3://{bucket}/run1"
    with pytest.raises(OutputError, match=r"boto3 is not installed.*s3_lease_without_boto3=true"):
        OutputLease(out, storage).acquire()
    assert _keys(s3, bucket, "run1/") == []
    opted = storage.model_copy(update={"s3_lease_without_boto3": True})
    store = store_for(out, opted)
    assert isinstance(store, GenericStore)
    store.settle_s = 0.0
    version = store.create(b"lease")  # written and read back through pyarrow's S3
    assert version is not None and store.create(b"other") is None
    assert _get(s3, bucket, "run1/_lease.json") == b"lease"
