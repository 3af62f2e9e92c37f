"""The labelled answer pairs (tests/data/entailment_pairs.jsonl) and the model-free residual judge."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from se_ray import answer_match as am

PAIRS = Path(__file__).resolve().parents[1] / "data" / "entailment_pairs.jsonl"
KINDS = {
    "paraphrase",
    "elaboration",
    "same_string_different_case",
    "other_entity",
    "non_answer",
    "several_candidates",
    "specificity",
    "number",
    "date",
    "unit",
    "abstention",
}


def load() -> list[dict]:
    with PAIRS.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_pairs_file_is_well_formed() -> None:
    pairs = load()
    assert len(pairs) >= 200
    assert sum(p["origin"] == "sampled" for p in pairs) >= 200
    for p in pairs:
        assert set(p) == {"question", "a", "b", "equivalent", "kind", "source", "origin", "split"}
        assert isinstance(p["equivalent"], bool)
        assert p["kind"] in KINDS
        assert p["source"] in {"geo", "nq"}
        assert p["origin"] in {"sampled", "constructed"}
        assert p["a"].strip() != p["b"].strip() or p["kind"] == "same_string_different_case"
        # The split is a function of the question, so no question straddles dev and test.
        digest = int(hashlib.sha1(p["question"].encode()).hexdigest(), 16)
        assert p["split"] == ("dev" if digest % 2 == 0 else "test")
    share = sum(p["equivalent"] for p in pairs) / len(pairs)
    assert 0.2 <= share <= 0.6


def test_residual_judge_accuracy_on_all_pairs() -> None:
    pairs = load()
    correct = sum(am.equivalent(p["question"], p["a"], p["b"]) == p["equivalent"] for p in pairs)
    assert correct / len(pairs) >= 0.90


def test_residual_judge_is_symmetric_on_the_pairs() -> None:
    for p in load():
        assert am.equivalent(p["question"], p["a"], p["b"]) == am.equivalent(p["question"], p["b"], p["a"])
