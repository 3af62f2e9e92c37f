"""Faults a running `se-ray label` meets from outside: signals and a second copy of itself.

All on the session's real Ray cluster and its one vLLM engine (ENGINE_OVERRIDES), through
the real CLI in subprocesses that join the cluster with RAY_ADDRESS.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SE_RAY_BIN, run_cli, sigint_as_from_a_terminal
from tests.faults.common import committed_ids, killed_at_exit, sets, wait_for

pytestmark = pytest.mark.slow

N = 32
# Small batches so that parts are committed one by one while the job runs.
SETTINGS = [
    f"data.limit={N}",
    "sampling.batch_size=4",
    "labeling.write_batch_size=4",
    "entailment.batch_size=4",
]
STOP_BUDGET_S = 15  # what the issue promises from the signal to the exit


def _args(src: Path, out: Path) -> list[str]:
    return ["label", "--input", str(src), "--output", str(out), *sets(*SETTINGS)]


def _second_copy_is_refused(args: list[str], out: Path, first: subprocess.Popen) -> None:
    started = time.monotonic()
    second = run_cli(*args, "--set", "sampling.batch_size=8", timeout=120)
    refused_s = time.monotonic() - started
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stdout == ""
    line = second.stderr.strip().splitlines()[-1]
    owner = f"{socket.gethostname()}:{first.pid}"
    assert line.startswith(f"se-ray label: error: output {out} is leased by {owner} since "), line
    assert line.endswith("(use --force or wait for it to go stale after 120 s)")
    assert refused_s < 60, f"the refusal took {refused_s:.1f} s"
    assert first.poll() is None  # the first run goes on


def _interrupt_after_new_part(
    args: list[str], out: Path, tmp_path: Path, signum: int, before: int, second_copy: bool = False
):
    """Start the job, send ``signum`` once a part beyond ``before`` ids is committed."""
    stdout, stderr = tmp_path / f"stdout.{signum}", tmp_path / f"stderr.{signum}"
    with stdout.open("w") as so, stderr.open("w") as se:
        proc = subprocess.Popen(
            [SE_RAY_BIN, *args],
            stdout=so,
            stderr=se,
            env={**os.environ},
            preexec_fn=sigint_as_from_a_terminal,
        )

    def alive() -> bool:
        return proc.poll() is None

    with killed_at_exit(proc):
        if second_copy:
            wait_for("the lease", (out / "_lease.json").exists, alive, 600)
            _second_copy_is_refused(args, out, proc)
        wait_for("a new committed part", lambda: len(committed_ids(out)) > before, alive, 600)
        sent = time.monotonic()
        proc.send_signal(signum)
        rc = proc.wait(timeout=120)
        wall = time.monotonic() - sent
    return rc, wall, stdout.read_text(), stderr.read_text()


def test_signals_and_a_second_copy_then_a_rerun_labels_every_id_once(engine, nq_dev, tmp_path):
    """Faults, in one labeling job (engine time is the suite's budget):

    1. a second `se-ray label` on the same --output while the first runs (a retried RayJob
       submitter, a second `ray job submit`). Before: both exited 0, 64 rows for 32 ids.
       Now: it exits 2 at once with one line naming the owner; the first run goes on;
    2. SIGTERM (`ray job stop`, Kubernetes) after the first committed part. Before: a native
       stack dump from Ray's core worker and exit 134. Now: one line, exit 143, within 15 s;
    3. Ctrl-C (SIGINT) on the resumed run after its first new part: one line, exit 130.

    Survives: every committed part, readable; the lease, released each time; the last run
    labels the rest and prints only its JSON summary; every id exactly once.
    """
    out = tmp_path / "out"
    args = _args(nq_dev, out)

    rc, wall, stdout, stderr = _interrupt_after_new_part(
        args, out, tmp_path, signal.SIGTERM, before=0, second_copy=True
    )
    print(f"SIGTERM after {len(committed_ids(out))} committed ids: exit {rc} in {wall:.1f} s")
    assert rc == 143, stderr[-3000:]
    assert wall < STOP_BUDGET_S, f"SIGTERM took {wall:.1f} s"
    assert stdout == ""
    assert stderr.strip().splitlines()[-1] == (
        "se-ray label: interrupted by SIGTERM; committed parts are kept, rerun to resume"
    )
    assert "SIGTERM received at time" not in stderr and "Traceback" not in stderr
    assert not (out / "_lease.json").exists()
    after_term = committed_ids(out)
    assert 0 < len(after_term) < N and len(set(after_term)) == len(after_term)

    rc, wall, stdout, stderr = _interrupt_after_new_part(
        args, out, tmp_path, signal.SIGINT, before=len(after_term)
    )
    print(f"SIGINT after {len(committed_ids(out))} committed ids: exit {rc} in {wall:.1f} s")
    assert rc == 130, stderr[-3000:]
    assert wall < STOP_BUDGET_S, f"SIGINT took {wall:.1f} s"
    assert stdout == ""
    assert stderr.strip().splitlines()[-1] == (
        "se-ray label: interrupted by SIGINT; committed parts are kept, rerun to resume"
    )
    assert not (out / "_lease.json").exists()
    after_int = committed_ids(out)
    assert len(after_term) < len(after_int) and set(after_term) <= set(after_int)

    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)  # strict: stdout holds the summary and nothing else
    assert summary["already_labeled"] == len(set(after_int))
    assert summary["labeled_now"] == N - len(set(after_int))
    ids = committed_ids(out)
    assert len(ids) == N and len(set(ids)) == N
    assert not (out / "_lease.json").exists()
