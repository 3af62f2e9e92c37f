"""Losing a node, and losing a training worker, in the middle of a job.

* Node loss: a two-node cluster of its own (tests/twonode.py). A helper client holds every CPU
  of the head with a placeholder actor and starts a detached vLLM engine, which can then only
  start on the worker node; the label job's actors land there too. Mid-job the worker node's
  raylet is killed and the placeholder released, so what was lost can start again on the head.
  This cluster pays its own engine starts (one, and one more for the restart on the head).
* Training-worker loss: on the session cluster, `se-ray train` with `train.max_failures=1`
  and a checkpoint every step; one `RayTrainWorker` process is killed mid-epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from se_ray.config import ABSTENTION_TEXT
from tests.conftest import SE_RAY_BIN
from tests.faults.common import (
    assert_one_line_error,
    assert_summary_contract,
    committed_ids,
    killed_at_exit,
    sets,
    wait_for,
    wait_or_fail,
)
from tests.twonode import TwoNodeCluster, two_node_cluster

pytestmark = pytest.mark.slow

# The two-node cluster's engine: its own settings (this cluster cannot reuse the session's).
# Shared (detached, in ray.namespace): the helper starts it and the label job finds it by name.
NODE_ENGINE = ["sampling.max_model_len=512", "sampling.kv_cache_space_gb=1", "ray.shared_engines=true"]
N = 24
HEAD_CPUS = WORKER_CPUS = 2  # the worker holds engine (1) + entailment (0.5); the head can take both
ENGINE_START_TIMEOUT_S = 480
ENGINE, ENTAILMENT = "LLMEngineActor", "MapWorker(MapBatches(EntropyStage))"
JOB_TIMEOUT_S = 900

# A client of the two-node cluster: fill the head, start the detached engine (on the worker, the
# only node with room), report, then release the head when told to.
HELPER = textwrap.dedent(
    """
    import json, sys

    import ray

    from se_ray.config import load_config
    from se_ray.engine import acquire_engines


    class HeadPlaceholder:
        def ping(self):
            return True


    if __name__ == "__main__":
        overrides, address, head_cpus = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
        cfg = load_config(None, overrides)
        ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=False)
        placeholder = ray.remote(HeadPlaceholder).options(
            num_cpus=head_cpus, resources={"head": 1}, name="head-placeholder", lifetime="detached"
        ).remote()
        ray.get(placeholder.ping.remote())
        pool = acquire_engines(cfg.sampling, cfg.ray)
        print("READY " + json.dumps({"name": pool.names[0], **pool.wait_ready()[0]}), flush=True)
        sys.stdin.readline()
        try:
            ray.kill(placeholder)
        except Exception as e:  # the GCS may be busy with the lost node: free it by name
            print(f"ray.kill(placeholder): {e!r}; by name", file=sys.stderr, flush=True)
            ray.kill(ray.get_actor("head-placeholder", namespace=cfg.ray.namespace))
        print("FREED", flush=True)
        sys.stdin.readline()
    """
)


def _node_of(cluster: TwoNodeCluster, class_name: str) -> set[str]:
    """Node ids where live actors of ``class_name`` run (the state API of the head)."""
    actors = cluster.ray_json("list", "actors", "--detail", "--limit", "1000", "--filter", "state=ALIVE")
    return {a["node_id"] for a in actors if a.get("class_name") == class_name and a.get("node_id")}


def _raylet_of(node_proc: subprocess.Popen) -> psutil.Process:
    found = [p for p in psutil.Process(node_proc.pid).children(recursive=True) if p.name() == "raylet"]
    assert len(found) == 1, [(p.pid, p.name()) for p in found]
    return found[0]


def _label(cluster: TwoNodeCluster, args: list[str], stdout: Path, stderr: Path) -> subprocess.Popen:
    env = {**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}"}
    with stdout.open("w") as so, stderr.open("w") as se:
        return subprocess.Popen([SE_RAY_BIN, *args], stdout=so, stderr=se, env=env)


def test_worker_node_lost_mid_label_job_then_rerun_labels_every_id_once(nq_dev, tmp_path):
    """Fault: the worker node of a two-node cluster (its raylet, SIGKILL) is lost while a label
    job's engine, entailment actor and sample actors run on it; the head then has room for them.

    What must survive: the job either finishes (its actors restarted on the head) or fails
    with one line on stderr and nothing on stdout, within the time bound, never hanging; the
    rerun finishes; every id is in the output exactly once.
    """
    with two_node_cluster(tmp_path / "cluster", HEAD_CPUS, WORKER_CPUS) as cluster:
        nodes = {n["node_id"]: n for n in cluster.alive_nodes()}
        head = next(i for i, n in nodes.items() if "head" in n["resources_total"])
        worker = next(i for i, n in nodes.items() if "worker_node" in n["resources_total"])
        address = f"127.0.0.1:{cluster.gcs_port}"
        engine_settings = ["sampling.enable_lora=false", *NODE_ENGINE]
        with (tmp_path / "helper.log").open("w") as helper_log:
            helper = subprocess.Popen(
                [sys.executable, "-c", HELPER, json.dumps(engine_settings), address, str(HEAD_CPUS)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=helper_log,
                text=True, env={**cluster.env, "RAY_ADDRESS": address},
            )  # fmt: skip
        try:
            _run_node_loss(cluster, helper, engine_settings, head, worker, nq_dev, tmp_path)
        finally:
            if helper.poll() is None:
                helper.kill()
            helper.wait()


def _run_node_loss(cluster, helper, engine_settings, head, worker, nq_dev, tmp_path) -> None:
    started = time.monotonic()
    line = "?"
    while line and not line.startswith("READY "):  # blocks until the engine is ready (or the helper died)
        line = helper.stdout.readline()
    assert line.startswith("READY "), (tmp_path / "helper.log").read_text()[-4000:]
    info = json.loads(line[len("READY ") :])
    engine_up_s = time.monotonic() - started
    assert time.monotonic() - started < ENGINE_START_TIMEOUT_S
    assert _node_of(cluster, ENGINE) == {worker}

    out = tmp_path / "out"
    args = [
        "label", "--input", str(nq_dev), "--output", str(out),
        *sets(f"data.limit={N}", "sampling.batch_size=4", "labeling.write_batch_size=4",
              "entailment.batch_size=4", engine=engine_settings),
    ]  # fmt: skip
    proc = _label(cluster, args, tmp_path / "stdout1", tmp_path / "stderr1")
    with killed_at_exit(proc):
        job_started = time.monotonic()
        names = {head: "head", worker: "worker"}
        placed: dict[str, list[str]] = {}

        def both_placed() -> bool:  # the entailment actor can be done and gone by the first commit
            for c in (ENGINE, ENTAILMENT):
                placed[c] = sorted(names.get(n, n) for n in _node_of(cluster, c))
            return all(placed.values())

        wait_for("an entailment actor alive", both_placed, lambda: proc.poll() is None, 600)
        assert placed == {ENGINE: ["worker"], ENTAILMENT: ["worker"]}  # what the node loss takes down
        wait_for("a committed part", lambda: len(committed_ids(out)) > 0, lambda: proc.poll() is None, 600)
        at_kill = len(committed_ids(out))
        raylet = _raylet_of(cluster.procs[1])
        raylet.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        helper.stdin.write("free\n")
        helper.stdin.flush()
        freed = "?"
        while freed and not freed.startswith("FREED"):  # Ray prints the raylet's death to drivers
            freed = helper.stdout.readline()
        assert freed.startswith("FREED"), (freed, (tmp_path / "helper.log").read_text()[-4000:])
        rc = wait_or_fail(
            proc, JOB_TIMEOUT_S,
            lambda: f"the label job did not end within {JOB_TIMEOUT_S} s of losing the worker node "
            f"({len(committed_ids(out))}/{N} ids committed)",
            tmp_path / "stderr1",
        )  # fmt: skip
        first_s = time.monotonic() - killed
    stdout, stderr = (tmp_path / "stdout1").read_text(), (tmp_path / "stderr1").read_text()
    wait_for(  # the node is really gone (the GCS marks it dead after its health checks fail)
        "the worker node marked dead", lambda: worker not in {n["node_id"] for n in cluster.alive_nodes()},
        lambda: True, 120,
    )  # fmt: skip
    if rc == 0:
        summary = assert_summary_contract(stdout, out)
        assert summary["labeled_now"] == N
        outcome = "finished"
    else:
        line = assert_one_line_error(stdout, stderr, "se-ray label: error: ", traceback_ok=True)
        outcome = f"failed (exit {rc}): {line}"
    ids = committed_ids(out)
    assert len(ids) == len(set(ids)), "a committed id was duplicated"

    rerun_started = time.monotonic()
    with killed_at_exit(_label(cluster, args, tmp_path / "stdout2", tmp_path / "stderr2")) as proc:
        rc2 = wait_or_fail(proc, JOB_TIMEOUT_S, lambda: "the rerun did not end", tmp_path / "stderr2")
    rerun_s = time.monotonic() - rerun_started
    assert rc2 == 0, (tmp_path / "stderr2").read_text()[-4000:]
    again = assert_summary_contract((tmp_path / "stdout2").read_text(), out)
    ids = committed_ids(out)
    assert len(ids) == N and len(set(ids)) == N, f"{len(ids)} rows for {len(set(ids))} ids"
    assert again["already_labeled"] + again["labeled_now"] == N
    print(
        f"\nnode loss: engine {info['name']} up on the worker in {engine_up_s:.0f} s; placed {placed}; "
        f"worker raylet killed {killed - job_started:.0f} s into the job with {at_kill}/{N} ids; "
        f"the job {outcome} {first_s:.0f} s later; rerun: {again['labeled_now']} labeled in {rerun_s:.0f} s; "
        f"engine now on {'the head' if _node_of(cluster, ENGINE) == {head} else 'no live node'}"
    )


# --- a Ray Train worker lost mid-epoch ---

TRAIN_ROWS = 4
TRAIN = {
    "num_workers": 2,
    "global_batch_size": 2,
    "micro_batch_size": 1,
    "epochs": 3,  # 4 rows / 2 per step x 3 epochs = 6 steps
    "max_length": 64,
    "zero_stage": 2,
    "method": "lora",
    "learning_rate": 1e-3,
    "checkpoint_every_steps": 1,
    "max_failures": 1,
    "export_merged": "false",
}
TRAIN_STEPS = 6
TRAIN_TIMEOUT_S = 900


def _train_labels(nq_dev: Path, folder: Path) -> Path:
    with nq_dev.open() as f:
        questions = [json.loads(line)["question"] for _, line in zip(range(TRAIN_ROWS), f, strict=False)]
    labels = folder / "labels"
    labels.mkdir(parents=True)
    targets = [ABSTENTION_TEXT if i % 2 else "Paris" for i in range(TRAIN_ROWS)]
    pq.write_table(
        pa.table({"id": [f"t{i}" for i in range(TRAIN_ROWS)], "question": questions, "target": targets}),
        labels / "part-0.parquet",
    )
    return labels


def _session_raylet() -> psutil.Process:
    """The raylet of the session cluster (its temp dir is named after this pytest process)."""
    mark = f"se-ray-test-{os.getpid()}"
    found = [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "raylet" and any(mark in a for a in p.info["cmdline"] or [])
    ]
    assert len(found) == 1, found
    return found[0]


def _train_workers() -> list[psutil.Process]:
    return [
        p
        for p in _session_raylet().children(recursive=True)
        if "RayTrainWorker" in " ".join(p.cmdline() or [p.name()])
    ]


def test_a_train_worker_killed_mid_epoch_restarts_from_the_last_checkpoint(ray_address, nq_dev, tmp_path):
    """Fault: one of the two Ray Train worker processes is SIGKILLed after the first
    checkpoint, while training goes on (`train.max_failures=1`, a checkpoint every step).

    What must survive: Ray Train's FailurePolicy retries; the new worker group restores the
    last registered checkpoint (steps after it carry attempt 1 in metrics.jsonl, and the
    history has every step exactly once); the same `se-ray train` exits 0 with its summary as
    the whole of stdout; the exported LoRA adapter loads with peft.
    """
    from se_ray.storage import filesystem
    from se_ray.train.checkpoint import RUN_NAME, restore_point

    labels = _train_labels(nq_dev, tmp_path / "run")
    out = tmp_path / "train_out"
    overrides = [f"train.{k}={v}" for k, v in TRAIN.items()]
    args = ["train", "--labels", str(labels), "--output", str(out), *sets(*overrides, engine=[])]
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    fs, _ = filesystem(str(out))
    run_path = str(out / "ray_train" / RUN_NAME)
    started = time.monotonic()
    with stdout.open("w") as so, stderr.open("w") as se:
        proc = subprocess.Popen([SE_RAY_BIN, *args], stdout=so, stderr=se, env={**os.environ})
    with killed_at_exit(proc):
        wait_for(
            "a registered checkpoint", lambda: (restore_point(fs, run_path) or 0) >= 1,
            lambda: proc.poll() is None, 600,
        )  # fmt: skip
        step_at_kill = restore_point(fs, run_path)
        workers = _train_workers()
        assert len(workers) == 2, [(p.pid, p.cmdline()) for p in workers]
        victim = max(workers, key=lambda p: p.pid)
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        rc = wait_or_fail(
            proc, TRAIN_TIMEOUT_S,
            lambda: f"se-ray train did not end within {TRAIN_TIMEOUT_S} s of losing a worker", stderr,
        )  # fmt: skip
        end = time.monotonic()
    log = stderr.read_text()
    assert rc == 0, log[-4000:]
    assert step_at_kill is not None and step_at_kill < TRAIN_STEPS, f"killed too late: step {step_at_kill}"
    summary = assert_summary_contract(stdout.read_text(), out)
    assert summary["steps"] == TRAIN_STEPS and summary["resumed_from_step"] is None
    assert "[FailurePolicy] RETRY" in log, log[-4000:]

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [s for s in lines if not s.get("summary")]
    assert [s["step"] for s in steps] == list(range(1, TRAIN_STEPS + 1))  # each step exactly once
    attempts = [s["attempt"] for s in steps]
    assert attempts == sorted(attempts) and set(attempts) == {0, 1}, attempts
    restored = max(s["step"] for s in steps if s["attempt"] == 0)  # the checkpoint restored from
    assert restored >= step_at_kill

    adapter = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    _assert_adapter_loads(adapter)
    print(
        f"\ntrain worker loss: worker pid {victim.pid} killed at checkpoint step {step_at_kill} "
        f"({killed - started:.0f} s in); restored from step {restored}; finished {end - killed:.0f} s later; "
        f"total {end - started:.0f} s"
    )


def _assert_adapter_loads(adapter: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from se_ray.models import resolve_model

    base_dir = resolve_model("builtin:smollm2-135m-instruct")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero
