"""Multi-node for real: a two-node Ray cluster on this machine, a job submitted over HTTP.

Everything goes through the tools a cluster user runs:

* ``ray start --head --block`` with the dashboard (and so the job server) on, and a second
  ``ray start --block --address=...`` joining it as a worker node; both are this test's own
  child processes and are stopped by signalling them (never ``ray stop``, which would stop
  every Ray cluster on the machine, the shared test cluster included);
* Ray's token authentication, on for the cluster and its clients with a token made for this
  test (``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN``, as the cluster README tells users);
* ``ray job submit --working-dir <repo>`` (the checkout uploaded minus ``.venv`` & co) of the
  quickstart ``se-ray label`` job, which runs in the cluster's own Python environment;
* ``ray list jobs/nodes/actors`` to see where the job's actors ran.

The nodes are sized so that the placement is forced, not left to the scheduler's mood: the
head has 2 CPUs and the engine asks for 2 (``sampling.num_cpus_per_engine=2``), the worker
has 1, so the vLLM engine can only start on the head; once it holds the head's CPUs, the
entailment actor (``entailment.num_cpus=0.5``) can only start on the worker. The test then
checks the labels and that the engine and the entailment actor ran on two distinct nodes,
the ones carrying the custom resources ``head`` and ``worker_node``.

This cluster is not the session's: it pays one vLLM engine start of its own, so every size
is tiny (4 questions, 3 samples, 12 tokens, a 1 GB KV cache).
"""

from __future__ import annotations

import json
import secrets
import shlex
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.twonode import TwoNodeCluster

pytestmark = pytest.mark.slow

DEMO = "se_ray/demo/nq_open_demo.jsonl"  # relative: resolved in the uploaded working dir
UPLOAD_EXCLUDES = [
    ".git",
    ".venv",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "out",
    "build",
    "bench/results",
]
JOB_TIMEOUT_S = 1200
ENGINE_CLASS = "LLMEngineActor"
ENTAILMENT_CLASS = "MapWorker(MapBatches(EntropyStage))"


def _labels(output: Path):
    from se_ray.storage import filesystem, join, read_parquet_folder

    fs, out = filesystem(str(output))
    return read_parquet_folder(fs, join(out, "labels"))


def test_label_job_submitted_to_a_two_node_cluster(cluster: TwoNodeCluster, tmp_path: Path):
    from se_ray.data import stable_id

    nodes = {n["node_id"]: n for n in cluster.alive_nodes()}
    head_id = next(i for i, n in nodes.items() if "head" in n["resources_total"])
    worker_id = next(i for i, n in nodes.items() if "worker_node" in n["resources_total"])
    assert head_id != worker_id

    # Token auth is really on: a client with the wrong token is turned away.
    denied = cluster.ray("job", "list", "--address", cluster.dashboard,
                         env={**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)})  # fmt: skip
    assert denied.returncode != 0
    assert "nvalid authentication token" in denied.stdout + denied.stderr

    output = tmp_path / "run1"
    submission = f"se-ray-multinode-{secrets.token_hex(4)}"
    runtime_env = {"excludes": UPLOAD_EXCLUDES, "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    overrides = [
        "data.limit=4",
        "sampling.num_samples=3",
        "sampling.max_tokens=12",
        "sampling.max_model_len=512",
        "sampling.kv_cache_space_gb=1",
        "sampling.num_cpus_per_engine=2",  # only the head has 2 CPUs
        "entailment.num_cpus=0.5",  # the head is full by then: the worker
    ]
    # The entrypoint runs in the unpacked working dir: `test ! -e .venv` proves it is the
    # uploaded copy (the checkout itself has a .venv) and that .venv stayed home. (`ray job
    # submit` shell-quotes its arguments, hence the explicit `sh -c`.)
    entrypoint = shlex.join(["se-ray", "label", "--input", DEMO, "--output", str(output),
                             *(a for o in overrides for a in ("--set", o))])  # fmt: skip
    started = time.perf_counter()
    job = cluster.ray(
        "job", "submit", "--address", cluster.dashboard, "--submission-id", submission,
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
        "sh", "-c", f"test ! -e .venv && test -f {DEMO} && exec {entrypoint}",
        timeout=JOB_TIMEOUT_S,
    )  # fmt: skip
    job_s = time.perf_counter() - started
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-6000:]
    jobs = cluster.ray_json("list", "jobs", "--detail")
    mine = next(j for j in jobs if j.get("submission_id") == submission)
    assert mine["status"] == "SUCCEEDED", mine

    summary = json.loads((output / "label_summary.json").read_text())
    assert summary["labeled_now"] == 4
    assert summary["output"] == str(output)

    with (REPO / DEMO).open() as f:
        want = sorted(stable_id(json.loads(line)["question"]) for _, line in zip(range(4), f, strict=False))
    labels = _labels(output)
    assert labels is not None, sorted(p.name for p in output.rglob("*"))
    assert sorted(labels.column("id").to_pylist()) == want  # each question exactly once
    for row in labels.to_pylist():
        assert len(row["samples"]) == 3
        assert row["target"] in (row["standard_answer"], "I don't know the answer.")

    # Where the job's actors ran (the state API keeps dead actors with their node).
    actors = cluster.ray_json(
        "list", "actors", "--detail", "--limit", "1000", "--filter", f"job_id={mine['job_id']}"
    )
    placed = {a["class_name"]: a["node_id"] for a in actors if a.get("node_id")}
    assert ENGINE_CLASS in placed and ENTAILMENT_CLASS in placed, actors
    assert placed[ENGINE_CLASS] == head_id
    assert placed[ENTAILMENT_CLASS] == worker_id
    assert len({placed[ENGINE_CLASS], placed[ENTAILMENT_CLASS]}) == 2
    print(f"two-node label job: {job_s:.0f} s; engine_ready_s={summary.get('engine_ready_s')}")
