"""The model-free residual judge: its protocol class, and its accuracy on the labelled answer pairs
(tests/data/entailment_pairs.jsonl)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from se_ray.answers import residual as am
from se_ray.judges.entailment import ENTAILMENT, NEUTRAL
from se_ray.judges.residual import ResidualJudge

PAIRS = Path(__file__).resolve().parents[2] / "data" / "entailment_pairs.jsonl"
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


# ---------------------------------------------------------------------------- the judge class


class _Q:
    def __init__(self, question: str, premise: str, hypothesis: str) -> None:
        self.question, self.premise, self.hypothesis = question, premise, hypothesis


def test_residual_judge_without_a_model() -> None:
    china = "What is the capital of China?"
    judge = ResidualJudge()
    got = judge.implications(
        [_Q(china, "Beijing", "The capital of China is Beijing."), _Q(china, "Beijing", "Shanghai")]
    )
    assert got == [ENTAILMENT, NEUTRAL]
    assert judge.model_calls == 0


def test_residual_judge_embeds_each_head_once_per_batch() -> None:
    import numpy as np

    batches: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        batches.append(list(texts))
        # Two heads are "similar" when they share a first letter.
        return np.array([[1.0, 0.0] if t.startswith("l") else [0.0, 1.0] for t in texts])

    q = "Who painted the Mona Lisa?"
    judge = ResidualJudge(embed=embed, threshold=0.9)
    queries = [
        _Q(q, "Leonardo", "Lionardo"),
        _Q(q, "Lionardo", "Leonardo"),
        _Q(q, "Leonardo", "Michelangelo"),
    ]
    assert judge.implications(queries) == [ENTAILMENT, ENTAILMENT, NEUTRAL]
    assert len(batches) == 1 and sorted(batches[0]) == ["leonardo", "lionardo", "michelangelo"]
    assert judge.model_calls == 3
    judge.implications(queries)
    assert judge.model_calls == 3  # cached
    judge.reset_cache()
    judge.implications(queries[:1])
    assert judge.model_calls == 5
