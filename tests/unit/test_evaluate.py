"""Stage 6 without a cluster: abstentions before judging, unanswerable questions, scores, the
results table, model resolution. (Judges: tests/unit/judges/; the pure pieces of `se-ray run`:
tests/unit/run/.)"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from se_ray import columns as col
from se_ray.config import ABSTENTION_TEXT, load_config
from se_ray.evaluate import (
    AnswerFlags,
    judge_answers,
    lora_engine_config,
    resolve_eval_model,
    results_table,
    split_references,
    summarize,
    vllm_lora_rank,
)
from se_ray.judges.correctness import F1Judge
from se_ray.metrics import aed


def _rows(n: int, refs=("x",)):
    return [
        {col.ID: f"q{i}", col.QUESTION: f"question {i}", col.REFERENCES: list(refs), col.CONTEXT: None}
        for i in range(n)
    ]


def test_judge_answers_detects_abstentions_before_judging():
    rows = _rows(4, refs=("Paris",))
    answers = ["Paris", "I don't know the answer.", "London", "i do not know"]
    flags = judge_answers(F1Judge(), rows, answers, ABSTENTION_TEXT)
    assert flags.abstained == [False, True, False, True]
    assert flags.correct == [True, None, False, None]
    assert flags.ids == ["q0", "q1", "q2", "q3"] and all(flags.answerable)


def test_unanswerable_questions_are_never_correct_and_scored_apart():
    rows = _rows(4, refs=("Paris",))
    for r in rows[2:]:
        r[col.ANSWERABLE], r[col.REFERENCES] = False, []
    answers = ["Paris", "Lyon", "Pondovia's capital is Xyz.", "I don't know the answer."]
    flags = judge_answers(F1Judge(), rows, answers, ABSTENTION_TEXT)
    assert flags.correct == [True, False, False, None]
    s = summarize(flags, bootstrap_samples=50)
    assert (s["num_questions"], s["correct"], s["incorrect"]) == (2, 1, 1)  # AED on answerable rows
    assert s["aed"] == pytest.approx(aed(2, 1, 1))
    assert (s["unanswerable"], s["unanswerable_abstained"]) == (2, 1)
    assert s["oracle_aed"] == pytest.approx(aed(2, 1, 0))


def test_summarize_counts_and_intervals():
    flags = AnswerFlags(
        ids=list("abcde"),
        abstained=[False, False, False, True, True],
        correct=[True, True, False, None, None],
        answerable=[True] * 5,
    )
    s = summarize(flags, bootstrap_samples=200)
    assert (s["num_questions"], s["correct"], s["incorrect"], s["abstained"], s["answered"]) == (
        5,
        2,
        1,
        2,
        3,
    )
    assert s["accuracy"] == pytest.approx(0.4) and s["engagement"] == pytest.approx(0.6)
    assert s["aed"] == pytest.approx(aed(5, 2, 1))
    for name in ("aed", "accuracy", "engagement"):
        low, high = s[f"{name}_ci95"]
        assert low <= s[name] <= high
    assert (s["unanswerable"], s["unanswerable_abstained"]) == (0, 0)


def test_results_table_schema_and_nulls():
    rows = _rows(2)
    flags = AnswerFlags(["q0", "q1"], [False, True], [True, None], [True, True])
    table = results_table(rows, ["x", "I don't know the answer."], flags, "f1")
    assert table.column_names == ["id", "question", "references", "answer", "abstained", "correct", "judge"]
    assert table.column("correct").to_pylist() == [True, None]
    assert table.schema.field("correct").type == pa.bool_()


def test_split_references_rejects_questions_without_references():
    rows = _rows(3)
    rows[1][col.REFERENCES] = None
    rows.append({**rows[0], col.ID: "u", col.REFERENCES: [], col.ANSWERABLE: False})
    keep, rejects = split_references(rows, "in.jsonl")
    assert [r[col.ID] for r in keep] == ["q0", "q2", "u"]  # unanswerable rows need no references
    assert rejects == [
        {"source": "in.jsonl", "line": None, "id": "q1", "reason": "no references: evaluation needs them"}
    ]


def test_vllm_lora_rank_rounds_up():
    assert [vllm_lora_rank(r) for r in (1, 4, 8, 9, 64)] == [1, 8, 8, 16, 64]
    with pytest.raises(ValueError):
        vllm_lora_rank(10_000)


def test_lora_engine_config_reuses_a_lora_sampling_engine():
    lora = load_config(None, ["sampling.enable_lora=true"]).sampling
    assert lora_engine_config(lora, 8) is lora
    plain = load_config(None).sampling
    served = lora_engine_config(plain, 16)
    assert (served.enable_lora, served.max_lora_rank, served.model) == (True, 16, plain.model)


def test_resolve_eval_model(tmp_path):
    cfg = load_config(None)
    base = resolve_eval_model(cfg, None)
    assert (base.kind, base.adapter, base.engine) == ("base", None, cfg.sampling)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    a = resolve_eval_model(cfg, str(adapter))
    assert (a.kind, a.adapter, a.engine.enable_lora, a.engine.model) == (
        "adapter",
        str(adapter),
        True,
        cfg.sampling.model,
    )
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    m = resolve_eval_model(cfg, str(merged))
    assert (m.kind, m.adapter, m.engine.model) == ("model", None, str(merged))
