"""What the fault tests share: reading what a run committed, and the stdout contract."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ENGINE_OVERRIDES

# Small sizes: the faults are the point, not the labels.
SMALL = [
    "sampling.max_tokens=12",
    "sampling.num_samples=4",
    "entailment.batch_size=8",
]


def sets(*overrides: str, engine: list[str] | None = None) -> list[str]:
    """``--set`` arguments: the session engine's settings (or ``engine``), SMALL, then ``overrides``."""
    items = [*(ENGINE_OVERRIDES if engine is None else engine), *SMALL, *overrides]
    return [a for o in items for a in ("--set", o)]


def committed_ids(out: Path) -> list[str]:
    """Every id in every committed part of ``out/labels`` (temporary ``_``/``.`` files skipped)."""
    labels = out / "labels"
    if not labels.is_dir():
        return []
    parts = sorted(
        p for p in labels.iterdir() if p.suffix == ".parquet" and not p.name.startswith((".", "_"))
    )
    return [i for p in parts for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


def rejects(out: Path) -> list[dict]:
    path = out / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_summary_contract(stdout: str, out: Path) -> dict:
    """stdout holds exactly one JSON document, the same as ``OUT/summary.json``; returns it.

    ``json.loads`` fails on anything after the document ("Extra data"); the comparison goes
    through a canonical dump because the summary may hold NaN (an AUROC of one class), which
    is not equal to itself.
    """
    summary = json.loads(stdout)
    beside = json.loads((out / "summary.json").read_text())
    assert json.dumps(summary, sort_keys=True) == json.dumps(beside, sort_keys=True)
    return summary


def assert_one_line_error(stdout: str, stderr: str, prefix: str, traceback_ok: bool = False) -> str:
    """An error ends as one line, stderr's last, and nothing on stdout; returns the line.

    ``traceback_ok``: stderr may hold tracebacks before that line (Ray forwards its workers'
    logs, and an unforeseen failure prints its traceback before the closing line)."""
    assert stdout == "", stdout[-2000:]
    if not traceback_ok:
        assert "Traceback" not in stderr, stderr[-4000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(prefix), stderr[-3000:]
    return line


def wait_for(what: str, ready: Callable[[], bool], alive: Callable[[], bool], timeout: float) -> float:
    """Poll ``ready`` until it holds; fail if ``alive`` turns false first or time runs out.
    Returns the seconds waited."""
    started = time.monotonic()
    while not ready():
        assert alive(), f"the process ended before {what}"
        assert time.monotonic() - started < timeout, f"no {what} after {timeout:.0f} s"
        time.sleep(0.25)
    return time.monotonic() - started


def wait_or_fail(proc: subprocess.Popen, timeout: float, hang: Callable[[], str], stderr: Path) -> int:
    """``proc``'s exit code; past ``timeout`` the test fails with "HANG: " + ``hang()`` (called
    then, so it can count what was committed) and stderr's tail."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"HANG: {hang()}; stderr tail:\n" + stderr.read_text()[-4000:])


@contextmanager
def killed_at_exit(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """``proc``, killed when the block ends if it is still running (a failed assertion)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
