"""`se-ray label` end to end: the real CLI, the session's Ray cluster and vLLM engine, Parquet on disk."""

import json
import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from se_ray import columns as col
from se_ray import entropy
from tests.conftest import ENGINE_OVERRIDES, SE_RAY_BIN, run_cli

pytestmark = pytest.mark.slow

SMALL = ["sampling.max_tokens=16"]


def _sets(*overrides: str) -> list[str]:
    return [a for o in (*ENGINE_OVERRIDES, *SMALL, *overrides) for a in ("--set", o)]


def _labels(out):
    return pq.ParquetDataset(out / "labels").read().to_pylist()


def test_label_64_questions(engine, nq_dev, tmp_path):
    out = tmp_path / "out"
    res = run_cli("label", "--input", str(nq_dev), "--output", str(out), *_sets("data.limit=64"))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["labeled_now"] == 64 and summary["questions"] == 64
    rows = _labels(out)
    assert len(rows) == 64 and len({r[col.ID] for r in rows}) == 64
    for name in (
        "id",
        "question",
        "samples",
        "sample_logprobs",
        "standard_answer",
        "cluster_ids",
        "semantic_entropy",
        "regular_semantic_entropy",
        "exact_entropy",
        "tau",
        "abstain",
        "target",
    ):
        assert name in rows[0], name
    for r in rows:
        assert len(r[col.SAMPLES]) == len(r[col.CLUSTER_IDS]) == len(r[col.SAMPLE_LOGPROBS]) == 10
        assert r[col.SEMANTIC_ENTROPY] == entropy.discrete_semantic_entropy(r[col.CLUSTER_IDS])
        assert r[col.ABSTAIN] == (r[col.SEMANTIC_ENTROPY] > r[col.TAU])
        assert r[col.TARGET] == ("I don't know the answer." if r[col.ABSTAIN] else r[col.STANDARD_ANSWER])
        assert all(lp <= 0 for lp in r[col.SAMPLE_LOGPROBS])
    assert summary["entailment_calls_per_question"] <= 10
    assert (out / "config.yaml").exists() and (out / "rejects.jsonl").read_text() == ""

    # A rerun on a finished output does no model work and writes nothing new.
    parts = sorted(p.name for p in (out / "labels").iterdir())
    started = time.monotonic()
    res = run_cli("label", "--input", str(nq_dev), "--output", str(out), *_sets("data.limit=64"))
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads(res.stdout)
    assert again["labeled_now"] == 0 and again["already_labeled"] == 64
    assert "engine_ready_s" not in again  # no engine was asked for
    assert sorted(p.name for p in (out / "labels").iterdir()) == parts
    assert time.monotonic() - started < 60


def test_sigkill_mid_run_then_resume_labels_every_id_once(engine, nq_dev, tmp_path):
    out = tmp_path / "out"
    args = [
        "label",
        "--input",
        str(nq_dev),
        "--output",
        str(out),
        *_sets(
            "data.limit=24",
            "sampling.batch_size=4",
            "labeling.write_batch_size=4",
            "entailment.batch_size=4",
            "sampling.num_samples=4",
        ),
    ]
    proc = subprocess.Popen(
        [SE_RAY_BIN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ}
    )
    labels = out / "labels"
    deadline = time.monotonic() + 600
    try:
        while not (labels.exists() and any(p.suffix == ".parquet" for p in labels.iterdir())):
            assert proc.poll() is None, "labeling finished or died before the first part"
            assert time.monotonic() < deadline
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = {r[col.ID] for r in _labels(out)}
    assert 0 < len(done_before) < 24

    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["already_labeled"] == len(done_before)
    assert summary["labeled_now"] == 24 - len(done_before)
    ids = [r[col.ID] for r in _labels(out)]
    assert len(ids) == 24 and len(set(ids)) == 24


def test_broken_rows_go_to_rejects_and_the_rest_is_labeled(engine, tmp_path):
    src = tmp_path / "broken.jsonl"
    src.write_text(
        "\n".join(
            [
                '{"id": "ok1", "question": "who wrote hamlet", "answer": ["Shakespeare"]}',
                "{not json",
                '{"id": "nq", "answer": ["x"]}',
                '{"id": "ok1", "question": "duplicate id"}',
                '{"id": "ok2", "question": "what is the capital of france"}',
                '{"id": "e", "question": ""}',
            ]
        )
        + "\n"
    )
    out = tmp_path / "out"
    res = run_cli("label", "--input", str(src), "--output", str(out), *_sets("sampling.num_samples=3"))
    assert res.returncode == 0, res.stderr[-3000:]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["id"]) for r in rejects] == [(2, None), (3, "nq"), (4, "ok1"), (6, "e")]
    assert all(r["source"] == str(src) and r["reason"] for r in rejects)
    assert "duplicate id" in rejects[2]["reason"] and "missing field 'question'" in rejects[1]["reason"]
    assert sorted(r[col.ID] for r in _labels(out)) == ["ok1", "ok2"]
    assert json.loads(res.stdout)["rejected"] == 4


def test_llm_judge_through_the_engine(engine, ray_address):
    """The reference LLM entailment prompt, answered by the session's vLLM engine."""
    import pyarrow as pa

    from se_ray.stages.entropy import EntropyStage
    from tests.conftest import test_config

    cfg = test_config("entailment.judge=llm", "entailment.model=")
    stage = EntropyStage(cfg.entailment, engine)
    batch = pa.table(
        {
            col.QUESTION: ["what is the capital of france"],
            col.SAMPLES: [["Paris", "Paris, France", "Lyon", "paris"]],
            col.SAMPLE_LOGPROBS: [[-0.5, -0.7, -2.0, -0.6]],
        }
    )
    row = stage(batch).to_pylist()[0]
    assert row[col.CLUSTER_IDS][0] == row[col.CLUSTER_IDS][3]  # identical after normalisation
    assert row[col.SEMANTIC_ENTROPY] == entropy.discrete_semantic_entropy(row[col.CLUSTER_IDS])
    # 3 distinct texts: 2 directions per judged pair, at most 3 pairs.
    assert 2 <= stage.judge.model_calls <= 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "sampling.num_samples=0"], "config key sampling.num_samples"),
        (["--set", "sampling.bogus=1"], "config key sampling.bogus: unknown key"),
        (["--set", "sampling.model=/nonexistent/model"], "model folder '/nonexistent/model' does not exist"),
    ],
)
def test_bad_config_or_model_fails_fast_with_one_line(tmp_path, nq_dev, args, message):
    res = run_cli("label", "--input", str(nq_dev), "--output", str(tmp_path / "o"), *args)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and message in res.stderr


def test_missing_input_fails_with_one_line(tmp_path):
    res = run_cli("label", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and "does not exist" in res.stderr and res.stderr.strip().count("\n") == 0
