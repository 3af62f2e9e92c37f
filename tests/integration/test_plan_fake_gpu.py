"""`se-ray plan --reserve` on a live Ray cluster whose GPUs are fake: a local head started with
``ray start --num-gpus 8 --resources '{"accelerator_type:H100": 1}'`` (on CPU, Ray only counts
resources), as an 8xH100 node advertises itself. The paper's plan is reserved phase by phase as
placement groups and released (a second reservation of the whole node succeeds); a plan the node
cannot hold fails with one line.

The head is this test's own child process, stopped by signalling it (never ``ray stop``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import RAY_BIN, REPO, SE_RAY_BIN
from tests.twonode import _free_ports, _node_ports

pytestmark = pytest.mark.slow

PAPER = str(REPO / "jobs" / "configs" / "paper.yaml")
RAYJOB = str(REPO / "cluster" / "kuberay" / "rayjob.yaml")


@pytest.fixture
def fake_gpu_head(tmp_path):
    (port,) = _free_ports(1)
    temp_dir = Path("/tmp") / f"seplan-{os.getpid()}"  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    # token authentication, with a token of this test's own (as tests/twonode.py does)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    log = (tmp_path / "head.log").open("w")
    cmd = [RAY_BIN, "start", "--head", "--block", f"--port={port}", "--num-cpus=64", "--num-gpus=8",
           '--resources={"accelerator_type:H100": 1}', "--include-dashboard=false",
           "--object-store-memory=100000000", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           *_node_ports()]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while "Ray runtime started" not in (tmp_path / "head.log").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[
            -3000:
        ]
        time.sleep(2)
    try:
        yield address, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _plan(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SE_RAY_BIN, "plan", "--config", PAPER, *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_reserve_places_and_releases_the_plan(fake_gpu_head):
    address, env = fake_gpu_head
    first = _plan(env, "--reserve", "--set", f"ray.address={address}")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout)
    assert summary["cluster"] == "live cluster"
    assert [r["phase"] for r in summary["reserve"]] == ["label", "train", "validate", "evaluate"]
    assert all(r["placed"] for r in summary["reserve"])
    # Released: the same 8 GPUs are reserved again at once.
    again = _plan(env, "--reserve", "--set", f"ray.address={address}", "--reserve-timeout", "20")
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(r["placed"] for r in json.loads(again.stdout)["reserve"])


def test_what_the_cluster_cannot_hold_fails_with_one_line(fake_gpu_head):
    address, env = fake_gpu_head
    # The live node alone: 16 whole-GPU engines are more than its 8 GPUs (no autoscaler to add one).
    big = ["--set", "sampling.num_gpus_per_engine=1", "--set", "sampling.num_engines=16"]
    res = _plan(env, "--reserve", "--set", f"ray.address={address}", *big)
    assert res.returncode == 2 and res.stdout == ""
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "se-ray plan: error: label: engines cannot be placed: live cluster reaches its node limits"
        )
    ), res.stderr[-2000:]
    # Planned on the KubeRay file (which autoscales to 4 nodes) but reserved on this one node: the
    # placement groups wait, time out, are released, and the plan says which did not fit.
    on_file = ["--cluster", RAYJOB, "--reserve", "--reserve-timeout", "5", "--set", f"ray.address={address}"]
    res = _plan(env, *on_file, "--set", "sampling.num_gpus_per_engine=1")
    assert res.returncode == 2 and res.stdout == ""
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"se-ray plan: error: reserve: label: .+ not placed within 5 s \(released\)", last), (
        last
    )
    after = _plan(env, "--reserve", "--set", f"ray.address={address}", "--reserve-timeout", "20")
    assert after.returncode == 0, after.stderr[-3000:]
