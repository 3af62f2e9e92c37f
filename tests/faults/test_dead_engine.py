"""A dead engine: the vLLM EngineCore process is killed (as the OOM killer would) mid-job.

On the session's real Ray cluster and its one vLLM engine (ENGINE_OVERRIDES), through the
real CLI in a subprocess. The restart under test re-creates the session engine in place
(same detached named actor, Ray actor restart), so the tests after this one keep using it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from tests import conftest
from tests.conftest import SE_RAY_BIN
from tests.faults.common import (
    assert_summary_contract,
    committed_ids,
    killed_at_exit,
    sets,
    wait_for,
    wait_or_fail,
)

pytestmark = pytest.mark.slow

N = 48
JOB_TIMEOUT_S = 900  # the job, one engine restart included, on a loaded 2-core machine
FIRST_PART_TIMEOUT_S = 420


def _engine_core(engine_pid: int) -> psutil.Process:
    """vLLM's EngineCore: a child process of the engine actor (titled ``VLLM::EngineCore``)."""
    found = [
        p
        for p in psutil.Process(engine_pid).children(recursive=True)
        if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())
    ]
    assert len(found) == 1, [(p.pid, p.name(), p.cmdline()) for p in found]
    return found[0]


def test_engine_core_killed_mid_job_is_restarted_and_every_id_labeled_once(engine, nq_dev, tmp_path):
    """Fault: after the first committed part, `kill -9` the vLLM EngineCore of the engine the
    job uses.

    Before: the job made no progress for over 5 minutes, Ctrl-C did not end it, only SIGTERM
    did; a resume was needed. Now: the dead engine is detected (EngineDeadError, or the call
    exceeding sampling.request_timeout_s=60), restarted, the in-flight batch retried, and the
    same run exits 0 with all 48 ids labeled exactly once; its log names the restart; stdout
    holds only the summary. The engine comes back as a new process under the same name.
    """
    import ray

    from se_ray.engine import engine_names

    cfg = conftest.test_config()  # the session engine's settings
    name = engine_names(cfg.sampling)[0]
    handle = ray.get_actor(name, namespace=cfg.ray.namespace)
    before = ray.get(handle.info.remote(), timeout=120)  # the engine is idle: max_concurrency=1
    core = _engine_core(before["pid"])

    out = tmp_path / "out"
    args = [
        "label", "--input", str(nq_dev), "--output", str(out),
        *sets(f"data.limit={N}", "sampling.batch_size=8", "sampling.request_timeout_s=60",
              "labeling.write_batch_size=8"),
    ]  # fmt: skip
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    started = time.monotonic()
    with stdout.open("w") as so, stderr.open("w") as se:
        proc = subprocess.Popen([SE_RAY_BIN, *args], stdout=so, stderr=se, env={**os.environ})
    with killed_at_exit(proc):
        first_s = wait_for(
            "a committed part", lambda: len(committed_ids(out)) > 0, lambda: proc.poll() is None,
            FIRST_PART_TIMEOUT_S,
        )  # fmt: skip
        at_kill = len(committed_ids(out))
        os.kill(core.pid, signal.SIGKILL)
        killed = time.monotonic()
        rc = wait_or_fail(
            proc, JOB_TIMEOUT_S - (killed - started),
            lambda: f"se-ray label did not end within {JOB_TIMEOUT_S} s of its start after its "
            f"EngineCore was killed ({len(committed_ids(out))}/{N} ids committed)",
            stderr,
        )  # fmt: skip
        end = time.monotonic()

    log = stderr.read_text()
    assert rc == 0, log[-4000:]
    summary = assert_summary_contract(stdout.read_text(), out)
    ids = committed_ids(out)
    assert len(ids) == N and len(set(ids)) == N, f"{len(ids)} rows for {len(set(ids))} ids"
    assert summary["labeled_now"] == N and summary["already_labeled"] == 0  # all in this run
    assert f"restarting vLLM engine {name}: " in log, log[-4000:]

    after = ray.get(handle.info.remote(), timeout=300)  # the same name answers, a new process
    assert after["pid"] != before["pid"]
    restart_line = next(line for line in log.splitlines() if "restarting vLLM engine" in line)
    print(
        f"\nEngineCore killed {first_s:.0f} s after start with {at_kill}/{N} ids committed; "
        f"{restart_line.split(': ', 1)[-1][:160]}\n"
        f"engine restart (vLLM start) {after['start_s']:.0f} s; kill -> exit {end - killed:.0f} s; "
        f"total wall {end - started:.0f} s; summary wall_s {summary.get('wall_s')}"
    )
    assert end - killed < JOB_TIMEOUT_S
