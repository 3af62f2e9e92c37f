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

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import RAY_BIN, REPO

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
NODE_START_TIMEOUT_S = 300
JOB_TIMEOUT_S = 1200
ENGINE_CLASS = "LLMEngineActor"
ENTAILMENT_CLASS = "MapWorker(MapBatches(EntropyStage))"


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_ports() -> list[str]:
    """Ports that default to fixed numbers (or collide) when two nodes share one machine."""
    nm, om, agent_http, agent_grpc, metrics, runtime_env = _free_ports(6)
    return [
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
    ]


class TwoNodeCluster:
    """A head (with the job server) and one worker node, as child processes of this test."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.temp_dir = Path("/tmp") / f"semn-{os.getpid()}"  # Ray's socket paths must stay short
        self.gcs_port, self.dashboard_port, self.client_port = _free_ports(3)
        self.token = secrets.token_hex(32)
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []
        venv_bin = str(Path(RAY_BIN).parent)
        env = {
            k: v
            for k, v in os.environ.items()
            # nothing of the shared test cluster or of ~/.ray's auth settings leaks in
            if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")
        }
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # a test cluster: stop at once on SIGTERM
            # the job's entrypoint `se-ray` is looked up on the nodes' PATH
            PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        self.env = env

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("w")
        self._logs.append(log)
        proc = subprocess.Popen(
            [RAY_BIN, "start", "--block", "--num-gpus=0", "--disable-usage-stats",
             "--object-store-memory=100000000", *_node_ports(), *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a last-resort kill reaches only it
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self._start(
            "head",
            ["--head", f"--port={self.gcs_port}", f"--ray-client-server-port={self.client_port}",
             "--num-cpus=2", '--resources={"head": 1}', f"--temp-dir={self.temp_dir}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}"],
        )  # fmt: skip
        self._wait(lambda: self.api("/api/version") is not None, "the head's dashboard")
        self._start(
            "worker",
            [f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=1", '--resources={"worker_node": 1}'],
        )
        self._wait(lambda: len(self.alive_nodes()) == 2, "the worker node to join")

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while not ready():
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"waiting for {what}: a `ray start` exited\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waiting for {what}\n{self.logs()}")
            time.sleep(2)

    def api(self, path: str):
        """GET a dashboard endpoint with the cluster token; None while it does not answer."""
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def alive_nodes(self) -> list[dict]:
        reply = self.api("/api/v0/nodes?limit=100&detail=true")
        if not reply or not reply.get("result"):
            return []
        return [n for n in reply["data"]["result"]["result"] if n.get("state") == "ALIVE"]

    def ray(self, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """The real `ray` CLI as a client of this cluster."""
        return subprocess.run(
            [RAY_BIN, *args], env=env or self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    def ray_json(self, *args: str):
        r = self.ray(*args, "--address", self.dashboard, "--format", "json")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return json.loads(r.stdout)

    def logs(self) -> str:
        out = []
        for name in ("head", "worker"):
            p = self.workdir / f"{name}.log"
            if p.exists():
                out.append(f"--- {name} ---\n" + p.read_text()[-3000:])
        return "\n".join(out)

    def stop(self) -> None:
        # SIGTERM to both at once: each `ray start --block` stops the processes it started.
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            # Whatever of that node outlived it (it has its own process group): gone too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for log in self._logs:
            log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    # `ray start` gives its raylet a fixed 30 s to register with the GCS; on a loaded 2-core
    # machine that can run out, so a failed start is retried once on fresh ports.
    for attempt in (1, 2):
        c = TwoNodeCluster(tmp_path / f"cluster{attempt}")
        try:
            c.start()
        except (RuntimeError, TimeoutError) as e:
            c.stop()
            if attempt == 2:
                raise
            print(f"two-node cluster start failed, retrying: {str(e).splitlines()[0]}")
            continue
        try:
            yield c
        finally:
            c.stop()
        return


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
