"""Bad rows and bad inputs: a poison row is isolated, a bad command fails with one line.

The poison-row test runs the real CLI on the session's Ray cluster and its one vLLM engine
(ENGINE_OVERRIDES); the bad-input tests fail before Ray or an engine is needed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import SE_RAY_BIN, run_cli
from tests.faults.common import (
    assert_one_line_error,
    assert_summary_contract,
    committed_ids,
    rejects,
    sets,
)

LONG_CHARS = 108_000  # the over-long question: ~27,000 tokens for a 1,024-token engine
GOOD = 7
REASON = re.compile(r"^prompt is ([\d,]+) tokens; the engine holds 1,024 \(\d+ kept for the answer\)$")
JOB_BUDGET_S = 400  # generous: a loaded 2-core machine; the engine is already running


def _poison_file(nq_dev: Path, folder: Path) -> tuple[Path, list[str]]:
    """8 questions with references: 7 from NQ-Open and one 108,000 characters long (in the middle)."""
    with nq_dev.open() as f:
        rows = [json.loads(line) for _, line in zip(range(GOOD), f, strict=False)]
    questions = [
        {"id": f"good-{i}", "question": r["question"], "answer": r["answer"]} for i, r in enumerate(rows)
    ]
    filler = "what is the name of the river that flows through the capital city of france "
    text = (filler * (LONG_CHARS // len(filler) + 1))[:LONG_CHARS]
    long = {"id": "long", "question": text, "answer": ["Seine"]}
    questions.insert(3, long)
    path = folder / "poison.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path, [q["id"] for q in questions if q["id"] != "long"]


def _assert_long_rejected(out: Path) -> int:
    """The long question alone is in rejects.jsonl, with the token count; returns that count."""
    found = rejects(out)
    assert [r["id"] for r in found] == ["long"], found
    match = REASON.match(found[0]["reason"])
    assert match, found[0]["reason"]
    tokens = int(match.group(1).replace(",", ""))
    assert tokens > 1024
    return tokens


@pytest.mark.slow
def test_an_over_long_question_is_rejected_and_the_rest_labeled_and_evaluated(engine, nq_dev, tmp_path):
    """Fault: one question of 8 is 108,000 characters (~27,000 tokens) for a 1,024-token engine.

    Before: `se-ray label` died with a 180-line VLLMValidationError traceback from the sample
    stage; nothing was labeled. Now `label` exits 0 with the 7 other ids labeled exactly once
    and the long one in rejects.jsonl with its reason ("prompt is N tokens; the engine holds
    1,024 ..."); `evaluate` scores the 7 and rejects the long one the same way. Both summaries
    are the whole of stdout, equal to OUTPUT/summary.json; evaluate's goes through
    `| python -m json.tool` as a user's pipe would.
    """
    src, good_ids = _poison_file(nq_dev, tmp_path)
    out = tmp_path / "labels_out"
    started = time.monotonic()
    res = run_cli(
        "label", "--input", str(src), "--output", str(out),
        *sets("sampling.batch_size=4", "labeling.write_batch_size=4"),
        timeout=JOB_BUDGET_S,
    )  # fmt: skip
    label_s = time.monotonic() - started
    assert res.returncode == 0, res.stderr[-4000:]
    summary = assert_summary_contract(res.stdout, out)
    ids = committed_ids(out)
    assert sorted(ids) == sorted(good_ids)  # each good id exactly once, the long one not at all
    tokens = _assert_long_rejected(out)
    assert summary["questions"] == GOOD + 1
    assert summary["rejected_by_engine"] == 1
    assert summary["labeled_now"] == GOOD
    assert "rejected id long: prompt is" in res.stderr
    assert "VLLMValidationError" not in res.stderr and "Traceback" not in res.stderr
    print(f"label: {GOOD} labeled, the {tokens:,}-token question rejected, {label_s:.0f} s")

    out = tmp_path / "eval_out"
    command = shlex.join(
        [SE_RAY_BIN, "evaluate", "--input", str(src), "--output", str(out), *sets("sampling.batch_size=4")]
    )
    started = time.monotonic()
    res = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{command} | {shlex.quote(sys.executable)} -m json.tool"],
        capture_output=True,
        text=True,
        timeout=JOB_BUDGET_S,
    )
    eval_s = time.monotonic() - started
    assert res.returncode == 0, res.stderr[-4000:]
    summary = assert_summary_contract(res.stdout, out)
    assert summary["num_questions"] == GOOD
    assert summary["rejected_by_engine"] == 1
    results = pq.read_table(out / "results.parquet").column("id").to_pylist()
    assert sorted(results) == sorted(good_ids)
    _assert_long_rejected(out)
    assert "Traceback" not in res.stderr
    print(f"evaluate: {GOOD} scored (AED {summary['aed']:.3f}), the long question rejected, {eval_s:.0f} s")
    assert label_s < JOB_BUDGET_S and eval_s < JOB_BUDGET_S


# --- bad inputs: each one line on stderr, exit 2, nothing on stdout, before any cluster work ---


def _good_input(folder: Path) -> Path:
    path = folder / "good.jsonl"
    path.write_text(json.dumps({"question": "What is the capital of France?", "answer": ["Paris"]}) + "\n")
    return path


def _run_bad(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    res = run_cli(*args, timeout=120)
    return res, time.monotonic() - started


def test_output_that_is_an_existing_file(tmp_path):
    """Fault: `--output` names an existing file. Before: a pyarrow traceback. Now: exit 2 with
    one line naming the output; the file is left as it was."""
    target = tmp_path / "out.txt"
    target.write_text("keep me\n")
    res, wall = _run_bad("label", "--input", str(_good_input(tmp_path)), "--output", str(target))
    assert res.returncode == 2, res.stderr[-3000:]
    line = assert_one_line_error(res.stdout, res.stderr, "se-ray label: error: ")
    assert line == f"se-ray label: error: output {target} is an existing file; give a folder"
    assert target.read_text() == "keep me\n"
    assert wall < 60


def test_unwritable_output(tmp_path):
    """Fault: an output nobody can create, even root: a folder under a regular file (as
    OUT=/etc/hostname/x would be). Now: exit 2 with one line naming the output."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    target = blocker / "x"
    res, wall = _run_bad("label", "--input", str(_good_input(tmp_path)), "--output", str(target))
    assert res.returncode == 2, res.stderr[-3000:]
    line = assert_one_line_error(res.stdout, res.stderr, "se-ray label: error: ")
    assert line.startswith(f"se-ray label: error: output {target} "), line
    assert "cannot be used" in line or "not writable" in line, line
    assert wall < 60


def test_input_with_no_valid_row(tmp_path):
    """Fault: an input whose every row is invalid. Before: exit 0 with an empty output. Now:
    exit 2 with "no valid question in FILE: 3 rows rejected, see .../rejects.jsonl (line 1:
    ...)", and rejects.jsonl holds the 3 rows with their reasons."""
    src = tmp_path / "bad.jsonl"
    src.write_text('not json\n{"question": "   "}\n{"id": 5, "question": 42}\n')
    out = tmp_path / "out"
    res, wall = _run_bad("label", "--input", str(src), "--output", str(out))
    assert res.returncode == 2, res.stderr[-3000:]
    line = assert_one_line_error(res.stdout, res.stderr, "se-ray label: error: ")
    assert line.startswith(f"se-ray label: error: no valid question in {src}: 3 rows rejected, see "), line
    assert f"{out}/rejects.jsonl (line 1: not valid JSON" in line, line
    found = rejects(out)
    assert [r["line"] for r in found] == [1, 2, 3] and all(r["reason"] for r in found)
    assert not (out / "labels").exists() and not (out / "summary.json").exists()
    assert wall < 60


def test_train_on_labels_without_a_target_column(tmp_path):
    """Fault: `se-ray train --labels` on a folder whose Parquet lacks the `target` column.
    Now: exit 2 before Ray starts, one line naming the part and the missing column."""
    labels = tmp_path / "run" / "labels"
    labels.mkdir(parents=True)
    part = labels / "part-0.parquet"
    pq.write_table(pa.table({"id": ["q1", "q2"], "question": ["a?", "b?"]}), part)
    out = tmp_path / "train_out"
    res, wall = _run_bad("train", "--labels", str(tmp_path / "run"), "--output", str(out))
    assert res.returncode == 2, res.stderr[-3000:]
    line = assert_one_line_error(res.stdout, res.stderr, "se-ray train: error: ")
    assert line.startswith(f"se-ray train: error: labels {part} lack column target "), line
    assert "(it has id, question)" in line
    assert not (out / "ray_train").exists()
    assert wall < 60
