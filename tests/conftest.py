"""Session-wide fixtures: one real local Ray cluster shared by every integration test.

The cluster is started with the real `ray start --head` so that CLI subprocesses (which
join with `ray.address`) and the test process share it, and the vLLM engine actor it
holds is started once per session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NQ_DEV = SHARED / "data" / "nq_open" / "NQ-open.dev.jsonl"
SVAMP = SHARED / "data" / "svamp" / "SVAMP.json"
RAY_BIN = str(Path(sys.executable).with_name("ray"))
SE_RAY_BIN = str(Path(sys.executable).with_name("se-ray"))

# Every test job uses these engine settings, so it reuses the session's one vLLM engine: a shared
# engine (detached, named by its settings; LoRA on so evaluation can serve adapters).
ENGINE_OVERRIDES = ["sampling.enable_lora=true", "ray.shared_engines=true"]
# 4 logical CPUs on 2 cores: the session engine (1 CPU) stays up while a job's
# entailment actor or two training workers are scheduled beside it.
TEST_CLUSTER_CPUS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """Address of a real single-node Ray cluster with 2 CPUs; the test process joins it."""
    import ray

    temp_dir = Path("/tmp") / f"se-ray-test-{os.getpid()}"  # Ray's socket paths must stay short
    port = _free_port()
    # Ray 2.60 turns on token auth whenever ~/.ray/auth_token exists (any earlier local
    # ray.init writes one); this loopback-only test cluster and its clients run without it.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # --block ties the cluster to this process: stopping it stops only this cluster,
    # not others on the machine (`ray stop` would kill every cluster).
    head = subprocess.Popen(
        [
            RAY_BIN,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--num-cpus={TEST_CLUSTER_CPUS}",
            "--num-gpus=0",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            ray.init(address=address, namespace="se-ray", log_to_driver=True)
            break
        except (ConnectionError, RuntimeError):
            if time.monotonic() > deadline or head.poll() is not None:
                head.kill()
                raise
            time.sleep(1)
    os.environ["RAY_ADDRESS"] = address
    yield address
    ray.shutdown()
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def nq_dev() -> Path:
    if not NQ_DEV.exists():
        pytest.skip(f"shared data missing: {NQ_DEV}")
    return NQ_DEV


def test_config(*overrides: str):
    from se_ray.config import load_config

    return load_config(None, [*ENGINE_OVERRIDES, *overrides])


@pytest.fixture(scope="session")
def engine(ray_address):
    """The session's one vLLM engine, started by `se-ray engines start` in a process that then
    exits (a shared engine outlives whoever started it); jobs with ENGINE_OVERRIDES reuse it."""
    from se_ray.engine import acquire_engines
    from se_ray.engine_admin import stop_engines

    cfg = test_config()
    flags = [a for o in ENGINE_OVERRIDES for a in ("--set", o)]
    started = run_cli("engines", "start", "--verb", "label", *flags)
    assert started.returncode == 0, started.stderr[-3000:]
    pool = acquire_engines(cfg.sampling, cfg.ray)
    assert pool.owned == [], "the session engine must be found running, not started here"
    yield pool
    stop_engines(cfg, "label")


@pytest.fixture(autouse=True)
def _stop_shared_engines_a_test_started(request):
    """A job with ENGINE_OVERRIDES but other engine settings starts shared engines and leaves them
    running, as it should; here they would hold the session cluster's CPUs: stop them after the
    test (all but the session engine)."""
    yield
    if "ray_address" not in request.fixturenames:
        return
    import ray

    if not ray.is_initialized():
        return
    from se_ray.engine import engine_names
    from se_ray.engine_admin import stop_engines

    cfg = test_config()
    stopped = stop_engines(cfg, every=True, keep=frozenset(engine_names(cfg.sampling)))["stopped"]
    if stopped:
        print(f"stopped shared engines the test left running: {stopped}")


@pytest.fixture
def cluster(tmp_path):
    """A fresh two-node cluster of its own (head: 2 CPUs, worker: 1), stopped after the test."""
    from tests.twonode import two_node_cluster

    with two_node_cluster(tmp_path) as c:
        yield c


def sigint_as_from_a_terminal() -> None:
    """``preexec_fn`` for a job a test interrupts with SIGINT. A suite started in the background
    without job control (`nohup bash -c '...' &`) runs with SIGINT ignored, every child inherits
    that, and se-ray keeps an ignored SIGINT ignored (test_a_signal_ignored_on_entry_stays_ignored):
    the child gets SIGINT at its default, as a terminal's foreground job does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SE_RAY_BIN, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ}
    )


def greedy_one_prompt_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Hugging Face ``generate``, greedy, each prompt alone (no padding): the reference answers."""
    import torch

    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers
