"""A simulated cluster: `se-ray run` end to end with its driver on a CPU head, its engine and
trainer on a worker node that cannot see the head's disk, and its output on S3.

* Two nodes of a local Ray cluster (tests/twonode.py), each with its own ``HOME``,
  ``SE_RAY_CACHE`` and ``TMPDIR``. The worker node runs in a mount namespace of its own
  (``unshare --mount --propagation private``) with a private tmpfs over the head's folders (and
  over this machine's own ``~/.cache/se-ray``): a path on the driver's disk is really missing
  where the engine runs. A Ray task on the worker checks that before the run.
* The head offers no CPU (``num_cpus=0``): the vLLM engine, the entailment actor and the
  training worker can only be placed on the worker; the driver, Ray Tune's trial function and
  0-CPU Ray Data tasks may run on either node.
* The output is ``s3://`` on a local moto server (boto3 checks what landed there).
* The built-in model is prepared into each node's own cache before start (hard links to this
  machine's prepared folder): the config names it ``builtin:...``, each node resolves that
  itself.

The run: 8 training questions (3 samples, one τ), a one-epoch LoRA fine-tune on one worker,
validation of the adapter, the untuned and the tuned model on 4 test questions. The test checks
every stage's output on S3, that the adapter travelled as its ``s3://`` URI, that the engine
(on the worker node) copied it into the worker's cache, and that nothing was copied into the
driver's cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, SE_RAY_BIN
from tests.twonode import NodeHome, two_node_cluster

pytestmark = pytest.mark.slow

REGION = "us-east-1"
DEMO = REPO / "se_ray" / "demo" / "geo_questions.jsonl"
BUILTIN = "smollm2-135m-instruct"
ENGINE_CLASS = "LLMEngineActor"
RUN_TIMEOUT_S = 330
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "se-ray-test-key",
    "AWS_SECRET_ACCESS_KEY": "se-ray-test-secret",
    "AWS_EC2_METADATA_DISABLED": "true",
}
TINY_RUN = [
    "split.train=8",
    "split.validation=4",
    "split.test=4",
    "split.ood_input=null",
    "split.ood_limit=null",
    "sampling.num_samples=3",
    "sampling.max_tokens=12",
    "sampling.max_model_len=512",
    "sampling.kv_cache_space_gb=1",
    # the worker's 2 CPUs: engine 0.5 + trial function 0.5 + one training worker 1
    "sampling.num_cpus_per_engine=0.5",
    "sweep.trial_num_cpus=0.5",
    "entailment.num_cpus=0.5",
    "sweep.taus=[1.0]",
    "sweep.methods=[semantic_entropy]",
    "sweep.seeds=1",
    "train.num_workers=1",
    "train.cpus_per_worker=1",
    "train.epochs=1",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.max_length=96",
    "train.select_checkpoint=last",
    "train.export_merged=false",
    "eval.bootstrap_samples=100",
]

# Run by the driver's Python on the head's side: a task on the worker node reports what it sees.
PROBE = """
import json, os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
@ray.remote(num_cpus=0, resources={"worker_node": 0.001})
def look(paths):
    return {"cache": os.environ.get("SE_RAY_CACHE"), "seen": {p: os.path.exists(p) for p in paths}}
print(json.dumps(ray.get(look.remote(sys.argv[2:]))))
"""


@pytest.fixture
def s3_endpoint():
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    import boto3

    for var, value in AWS_ENV.items():
        monkeypatch.setenv(var, value)
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)


@pytest.fixture
def nodes():
    """The head's and the worker's own folders, under a short root (Ray's socket paths are
    limited to ~107 characters); each cache holds the prepared built-in model."""
    from se_ray.models import cache_dir, prepare_builtin

    prepare_builtin(BUILTIN)  # this machine's copy, prepared once
    prepared = cache_dir() / "models" / BUILTIN
    root = Path("/tmp") / f"se2n-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    head, worker = NodeHome(root / "head").make(), NodeHome(root / "worker").make()
    for node in (head, worker):
        shutil.copytree(prepared, node.cache / "models" / BUILTIN, copy_function=_link_or_copy)
    yield root, head, worker
    shutil.rmtree(root, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _keys(s3, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _json(s3, bucket: str, key: str):
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def _summary(stdout: str) -> dict:
    start = stdout.rfind("\n{\n")
    return json.loads(stdout[start + 1 :] if start >= 0 else stdout)


def _probe_worker(cluster, driver_env: dict, paths: list[str]) -> dict:
    address = f"127.0.0.1:{cluster.gcs_port}"
    res = subprocess.run(
        [sys.executable, "-c", PROBE, address, *paths],
        env=driver_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _check_stage(s3, bucket: str, prefix: str) -> dict:
    stage = _json(s3, bucket, f"{prefix}/_stage.json")
    assert stage["done"], (prefix, stage)
    return stage["summary"]


def _check_evaluation(s3, bucket: str, prefix: str, n: int) -> dict:
    keys = _keys(s3, bucket, prefix + "/")
    assert f"{prefix}/results.parquet" in keys, keys
    metrics = _json(s3, bucket, f"{prefix}/metrics.json")
    assert metrics["num_questions"] + metrics.get("unanswerable", 0) == n, metrics
    assert metrics["correct"] + metrics["incorrect"] + metrics["abstained"] == metrics["num_questions"]
    return metrics


def test_run_on_two_nodes_with_separate_disks_and_s3_output(s3, s3_endpoint, nodes):
    root, head, worker = nodes
    bucket = f"se-ray-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    output = f"s3://{bucket}/run"
    driver_only = head.cache / "written-by-the-driver.txt"
    driver_only.write_text("only the head's disk has this")
    machine_cache = Path.home() / ".cache" / "se-ray"  # this machine's: no node's
    started = time.monotonic()
    with two_node_cluster(
        root / "cluster",
        head_cpus=0,
        worker_cpus=2,
        env=AWS_ENV,
        head_env=head.env(),
        worker_env=worker.env(),
        hide_from_worker=[head.root, machine_cache],
    ) as cluster:
        cluster_s = time.monotonic() - started
        driver_env = {**cluster.env, **head.env()}
        seen = _probe_worker(cluster, driver_env, [str(driver_only), str(machine_cache / "models")])
        assert seen["cache"] == str(worker.cache)
        assert not any(seen["seen"].values()), seen  # the head's disk is not the worker's
        assert driver_only.exists()

        sets = [
            f"ray.address=127.0.0.1:{cluster.gcs_port}",
            f"storage.s3_endpoint_override={s3_endpoint}",
            "storage.s3_scheme=http",
            f"storage.s3_region={REGION}",
            *TINY_RUN,
        ]
        run_started = time.monotonic()
        res = subprocess.run(
            [SE_RAY_BIN, "run", "--config", str(REPO / "jobs" / "configs" / "quickstart.yaml"),
             "--input", str(DEMO), "--output", output, *(a for s in sets for a in ("--set", s))],
            env=driver_env, cwd=head.home, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        )  # fmt: skip
        run_s = time.monotonic() - run_started
        assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-8000:])
        nodes_by_id = {n["node_id"]: n for n in cluster.alive_nodes()}
        worker_id = next(i for i, n in nodes_by_id.items() if "worker_node" in n["resources_total"])
        actors = cluster.ray_json("list", "actors", "--detail", "--limit", "1000")
    summary = _summary(res.stdout)

    # Every stage's output is on S3.
    assert summary["stages"]["split"] == "ran" and summary["stages"]["label"] == "ran"
    split = _check_stage(s3, bucket, "run/split")
    assert (split["train"], split["validation"], split["test"]) == (8, 4, 4)
    keys = _keys(s3, bucket, "run/")
    for name in ("train", "validation", "test"):
        assert f"run/split/{name}.jsonl" in keys
    assert _check_stage(s3, bucket, "run/label")["labeled_now"] == 8
    assert any(k.startswith("run/label/labels/") and k.endswith(".parquet") for k in keys), keys
    trials = sorted(
        {k.split("/")[2] for k in keys if k.startswith("run/trials/")} - {""}
    )  # "" : a dir marker
    assert len(trials) == 1, trials
    trial = f"run/trials/{trials[0]}"
    result = _check_stage(s3, bucket, trial)
    adapter_uri = f"{output}/trials/{trials[0]}/train/adapter"
    assert result["model"] == adapter_uri  # a URI, not a path on some node's disk
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert f"{trial}/train/adapter/{name}" in keys
    validation = _check_evaluation(s3, bucket, f"{trial}/validation", 4)
    test = _check_evaluation(s3, bucket, f"{trial}/test", 4)
    assert validation["adapter"] == test["adapter"] == adapter_uri
    assert validation["model_kind"] == test["model_kind"] == "adapter"
    for split_name in ("validation", "test"):
        untuned = _check_evaluation(s3, bucket, f"run/untuned/{split_name}", 4)
        assert untuned["adapter"] is None
    assert "run/summary.json" in keys and "run/report.md" in keys
    assert set(summary["methods"]) == {"untuned", "semantic_entropy"}

    # The adapter was evaluated on the worker node: its engine ran there and copied the adapter
    # from S3 into the worker's own cache; the driver's cache got no copy of anything.
    engines = [a for a in actors if a["class_name"] == ENGINE_CLASS]
    assert engines and {a["node_id"] for a in engines} == {worker_id}, engines
    copies = [json.loads(p.read_text()) for p in (worker.cache / "artifacts").glob("*/.se-ray-source.json")]
    assert [c["uri"] for c in copies] == [adapter_uri]
    assert {f[0] for f in copies[0]["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert not (head.cache / "artifacts").exists() and not (head.cache / "remote").exists()
    print(f"two-node S3 run: cluster start {cluster_s:.0f} s, se-ray run {run_s:.0f} s")
