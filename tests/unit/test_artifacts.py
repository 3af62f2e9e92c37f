"""se_ray.artifacts: a URI's folder copied into this node's cache, content-keyed, atomic and safe
under concurrent callers; the callers (resolve_model, check_model, resolve_eval_model) that keep
URIs as URIs. ``file://`` URIs go through the same pyarrow code path as ``s3://``; one test runs
against moto's S3 server."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path

import pytest

from se_ray.artifacts import (
    SOURCE_FILE,
    ArtifactNotFoundError,
    RemoteFile,
    cache_root,
    content_key,
    is_in_flight,
    materialize,
)
from se_ray.config import StorageConfig, load_config
from se_ray.evaluate import resolve_eval_model
from se_ray.models import ModelNotFoundError, check_model, resolve_model


@pytest.fixture(autouse=True)
def node_cache(tmp_path, monkeypatch) -> Path:
    """This test's own node cache (SE_RAY_CACHE)."""
    cache = tmp_path / "node-cache"
    monkeypatch.setenv("SE_RAY_CACHE", str(cache))
    return cache


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _uri(path: Path) -> str:
    return f"file://{path}"


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != SOURCE_FILE
    }


ADAPTER = {
    "adapter_config.json": json.dumps({"r": 16, "peft_type": "LORA"}).encode(),
    "adapter_model.safetensors": b"\x00weights" * 100,
    "sub/dir/extra.txt": b"nested",
}


# --- content_key and is_in_flight: pure ----------------------------------------------------


def test_content_key_ignores_listing_order_and_a_trailing_slash():
    a, b = RemoteFile("a", 1, 10), RemoteFile("b/c", 2, 20)
    assert content_key("s3://x/y", [a, b]) == content_key("s3://x/y/", [b, a])


@pytest.mark.parametrize(
    "changed",
    [
        ("s3://x/z", [RemoteFile("a", 1, 10)]),  # another URI
        ("s3://x/y", [RemoteFile("b", 1, 10)]),  # another name
        ("s3://x/y", [RemoteFile("a", 2, 10)]),  # another size
        ("s3://x/y", [RemoteFile("a", 1, 11)]),  # rewritten (another mtime)
        ("s3://x/y", [RemoteFile("a", 1, 10), RemoteFile("c", 0, 0)]),  # a file more
        ("s3://x/y", []),
    ],
)
def test_content_key_changes_with_anything_that_changes_the_content(changed):
    assert content_key(*changed) != content_key("s3://x/y", [RemoteFile("a", 1, 10)])


def test_content_key_is_a_short_hex_name():
    key = content_key("gs://b/m", [RemoteFile("config.json", 3, 4)])
    assert len(key) == 24 and int(key, 16) >= 0


@pytest.mark.parametrize(
    ("name", "in_flight"),
    [
        (".adapter_model.safetensors.0123abcd.tmp", True),
        ("sub/.x.tmp", True),
        ("adapter_model.safetensors", False),
        (".hidden", False),
        ("x.tmp", False),
        ("sub/.dir/file", False),
    ],
)
def test_is_in_flight(name, in_flight):
    assert is_in_flight(name) is in_flight


# --- materialize ---------------------------------------------------------------------------


def test_a_local_path_is_returned_as_it_is_and_nothing_is_copied(tmp_path, node_cache):
    folder = _folder(tmp_path / "adapter", ADAPTER)
    assert materialize(str(folder)) == str(folder)
    assert materialize("~/x") == os.path.expanduser("~/x")
    assert not node_cache.exists()


def test_a_uri_is_copied_into_this_nodes_cache_whole(tmp_path, node_cache):
    folder = _folder(tmp_path / "remote" / "adapter", ADAPTER)
    local = Path(materialize(_uri(folder)))
    assert local.parent == cache_root() == node_cache / "artifacts"
    assert _tree(local) == ADAPTER
    source = json.loads((local / SOURCE_FILE).read_text())
    assert source["uri"] == _uri(folder) and len(source["files"]) == len(ADAPTER)
    assert [p.name for p in cache_root().iterdir() if p.name.endswith(".tmp")] == []


def test_an_unchanged_uri_is_copied_once(tmp_path, caplog):
    folder = _folder(tmp_path / "remote", ADAPTER)
    with caplog.at_level(logging.INFO, logger="se_ray.artifacts"):
        first = materialize(_uri(folder))
        inode = os.stat(first).st_ino
        again = materialize(_uri(folder))
    assert again == first and os.stat(again).st_ino == inode
    assert sum("materialised" in r.message for r in caplog.records) == 1


def test_a_folder_rewritten_at_the_same_uri_gets_a_fresh_copy(tmp_path):
    folder = _folder(tmp_path / "remote", ADAPTER)
    first = materialize(_uri(folder))
    (folder / "adapter_model.safetensors").write_bytes(b"retrained, longer weights" * 10)
    second = materialize(_uri(folder))
    assert second != first
    assert (Path(second) / "adapter_model.safetensors").read_bytes() == b"retrained, longer weights" * 10
    assert _tree(Path(first)) == ADAPTER  # a copy in use elsewhere is never changed under it


def test_an_atomic_write_in_flight_is_not_copied(tmp_path):
    folder = _folder(tmp_path / "remote", {**ADAPTER, ".adapter_config.json.abc123.tmp": b"half"})
    local = Path(materialize(_uri(folder)))
    assert _tree(local) == ADAPTER


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: (p / "empty").mkdir() or p / "empty"])
def test_a_uri_with_no_files_is_not_found(tmp_path, node_cache, make):
    with pytest.raises(ArtifactNotFoundError, match="no such folder"):
        materialize(_uri(make(tmp_path)))
    assert not node_cache.exists()


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    from se_ray import artifacts

    folder = _folder(tmp_path / "remote", ADAPTER)

    def half_then_fail(store, files, into):
        (into / "adapter_config.json").parent.mkdir(parents=True)
        (into / "adapter_config.json").write_bytes(b"{")
        raise OSError("connection reset")

    download = artifacts._download
    monkeypatch.setattr(artifacts, "_download", half_then_fail)
    with pytest.raises(OSError, match="connection reset"):
        materialize(_uri(folder))
    assert [p.name for p in cache_root().iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(artifacts, "_download", download)
    assert _tree(Path(materialize(_uri(folder)))) == ADAPTER  # the next call starts clean


def test_the_first_rename_wins(tmp_path):
    from se_ray.artifacts import _place

    theirs, ours = (
        _folder(tmp_path / "key", {"a": b"theirs"}),
        _folder(tmp_path / ".key.1.tmp", {"a": b"ours"}),
    )
    _place(ours, theirs)
    assert (theirs / "a").read_bytes() == b"theirs" and not ours.exists()
    with pytest.raises(OSError):
        _place(tmp_path / "no-such-tmp", tmp_path / "no-target")


def _materialize_in_child(uri: str, cache: str, results) -> None:
    os.environ["SE_RAY_CACHE"] = cache
    results.put(materialize(uri))


def test_concurrent_processes_get_one_whole_copy(tmp_path, node_cache):
    folder = _folder(tmp_path / "remote", {**ADAPTER, "big.bin": os.urandom(4 << 20)})
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_materialize_in_child, args=(_uri(folder), str(node_cache), results))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    paths = {results.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(paths) == 1
    local = Path(paths.pop())
    assert _tree(local) == _tree(folder)
    key = local.name
    assert sorted(p.name for p in cache_root().iterdir()) == sorted([key, f".{key}.lock"])  # no temporaries


# --- the callers: models and evaluation ----------------------------------------------------


def test_resolve_model_materialises_a_model_uri_here(tmp_path, node_cache):
    folder = _folder(tmp_path / "merged", {"config.json": b"{}", "model.safetensors": b"w"})
    local = resolve_model(_uri(folder))
    assert Path(local).parent == node_cache / "artifacts"
    assert (Path(local) / "config.json").read_bytes() == b"{}"


def test_resolve_model_refuses_a_uri_without_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model(_uri(tmp_path / "missing"))
    adapter_only = _folder(tmp_path / "adapter", ADAPTER)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(_uri(adapter_only))


def test_check_model_looks_at_a_uri_without_copying_it(tmp_path, node_cache):
    folder = _folder(tmp_path / "merged", {"config.json": b"{}"})
    check_model(_uri(folder))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        check_model(_uri(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        check_model(str(tmp_path / "missing"))
    assert not node_cache.exists()


def test_resolve_eval_model_keeps_uris_as_uris(tmp_path, node_cache):
    cfg = load_config(None)
    adapter = _folder(tmp_path / "adapter", ADAPTER)
    a = resolve_eval_model(cfg, _uri(adapter))
    assert (a.kind, a.adapter, a.name) == ("adapter", _uri(adapter), _uri(adapter))
    assert a.engine.enable_lora and a.engine.max_lora_rank == 16  # read from the URI's config
    merged = _folder(tmp_path / "merged", {"config.json": b"{}"})
    m = resolve_eval_model(cfg, _uri(merged))
    assert (m.kind, m.adapter, m.engine.model) == ("model", None, _uri(merged))
    hub = resolve_eval_model(cfg, "org/some-model")
    assert (hub.kind, hub.engine.model) == ("model", "org/some-model")
    assert not node_cache.exists()  # the driver read one small JSON and copied nothing


def test_the_engine_loads_an_adapter_uri_from_its_own_nodes_copy(tmp_path, node_cache):
    pytest.importorskip("vllm")
    from se_ray.engine_actor import LLMEngineActor

    engine = object.__new__(LLMEngineActor)  # no vLLM engine: only its adapter bookkeeping
    engine.storage, engine._lora_ids = None, {}
    folder = _folder(tmp_path / "remote" / "adapter", ADAPTER)
    first = engine._lora_request(_uri(folder))
    assert Path(first.lora_path).parent == node_cache / "artifacts"
    assert _tree(Path(first.lora_path)) == ADAPTER
    assert engine._lora_request(_uri(folder)).lora_int_id == first.lora_int_id
    (folder / "adapter_model.safetensors").write_bytes(b"retrained")
    second = engine._lora_request(_uri(folder))  # same URI, new content: vLLM must load it afresh
    assert second.lora_int_id != first.lora_int_id and second.lora_path != first.lora_path
    assert engine._lora_request(None) is None


# --- s3:// through moto's server -----------------------------------------------------------


@pytest.fixture
def s3_storage(monkeypatch):
    pytest.importorskip("moto.server")
    import boto3
    from moto.server import ThreadedMotoServer

    for var, value in (
        ("AWS_ACCESS_KEY_ID", "k"),
        ("AWS_SECRET_ACCESS_KEY", "s"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ):
        monkeypatch.setenv(var, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="artifacts")
    yield client, StorageConfig(s3_endpoint_override=endpoint, s3_scheme="http", s3_region="us-east-1")
    server.stop()


def test_an_s3_adapter_is_materialised_and_refreshed(s3_storage, node_cache):
    client, storage = s3_storage
    for name, data in ADAPTER.items():
        client.put_object(Bucket="artifacts", Key=f"run/trial/adapter/{name}", Body=data)
    uri = "s3://artifacts/run/trial/adapter"
    local = Path(materialize(uri, storage))
    assert local.parent == node_cache / "artifacts" and _tree(local) == ADAPTER
    assert materialize(uri, storage) == str(local)
    client.put_object(Bucket="artifacts", Key="run/trial/adapter/adapter_model.safetensors", Body=b"new")
    fresh = Path(materialize(uri, storage))
    assert fresh != local and (fresh / "adapter_model.safetensors").read_bytes() == b"new"
    cfg = load_config(None).model_copy(update={"storage": storage})
    assert resolve_eval_model(cfg, uri).adapter == uri
