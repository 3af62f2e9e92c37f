"""Early stop in the sample stage, with a scripted engine and an exact-match judge (no cluster)."""

import random

import pyarrow as pa
import pytest

from se_ray import columns as col
from se_ray import entropy
from se_ray.config import EntailmentConfig, SamplingConfig
from se_ray.engine import Completion, EnginePool
from se_ray.stages.early_stop import samples_to_decide
from se_ray.stages.entropy import EntropyStage
from se_ray.stages.sample import SampleStage
from tests.unit.conftest import NeverEquivalentJudge

TAU = 1.0


class ScriptedEngine:
    """An engine pool of one that answers each question from its script, in order, and records
    every call's sample counts (the pool's interface: ``chat`` and ``one``)."""

    def __init__(self, scripts):
        self.scripts = {q: iter(answers) for q, answers in scripts.items()}
        self.calls: list[list[int]] = []

    def one(self):
        return self

    def chat(self, conversations, params):
        self.calls.append([p["n"] for p in params])
        out = []
        for conv, p in zip(conversations, params, strict=True):
            question = conv[-1]["content"]
            if p["temperature"] < 0.5:
                out.append([Completion(f"standard {question}", -1.0, 2)])
            else:
                out.append([Completion(next(self.scripts[question]), -0.5, 1) for _ in range(p["n"])])
        return out


@pytest.fixture
def stage_for(monkeypatch):
    monkeypatch.setattr(
        "se_ray.judges.entailment.build_judge", lambda cfg, engines=None: NeverEquivalentJudge()
    )

    def make(scripts, m=10, round_size=1):
        cfg = SamplingConfig(num_samples=m, early_stop=True, early_stop_round=round_size)
        engine = ScriptedEngine(scripts)
        stage = SampleStage(cfg, engine, entailment=EntailmentConfig(), tau=TAU)
        return stage, engine

    return make


def test_samples_to_decide_skips_rounds_that_cannot_decide():
    # M=10, tau=1: five distinct answers already force SE > 1 (the fewest that can decide).
    assert samples_to_decide([], 10, TAU) == 5
    # Five identical answers: two more identical ones make "answer" certain (SE([7,1,1,1]) <= 1).
    assert samples_to_decide([5], 5, TAU) == 2
    assert samples_to_decide([3, 2], 1, TAU) == 1
    assert samples_to_decide([1], 0, TAU) == 0


def test_early_stop_stops_decided_questions_and_keeps_the_label(stage_for):
    scripts = {
        "confident": ["Paris"] * 10,
        "diverse": [f"answer {i}" for i in range(10)],
        "mixed": ["Lima", "Lima", "Cusco", "Lima", "Quito", "Lima", "Cusco", "Lima", "Lima", "Lima"],
    }
    stage, engine = stage_for(scripts)
    batch = pa.table({col.ID: list(scripts), col.QUESTION: list(scripts)})
    rows = {r[col.QUESTION]: r for r in stage(batch).to_pylist()}
    assert len(rows["confident"][col.SAMPLES]) == 7 and rows["confident"][col.CLUSTER_IDS] == [0] * 7
    assert len(rows["diverse"][col.SAMPLES]) == 5 and rows["diverse"][col.CLUSTER_IDS] == [0, 1, 2, 3, 4]
    assert rows["mixed"][col.SAMPLES] == scripts["mixed"][: len(rows["mixed"][col.SAMPLES])]
    for row in rows.values():
        ids, k = row[col.CLUSTER_IDS], len(row[col.SAMPLES])
        assert row[col.NUM_GENERATED] == k + 1
        assert row[col.STANDARD_ANSWER] == f"standard {row[col.QUESTION]}"
        assert len(row[col.SAMPLE_LOGPROBS]) == len(row[col.SAMPLE_TOKEN_COUNTS]) == len(ids) == k
        decided = entropy.label_is_decided(entropy.cluster_counts(ids), 10 - k, TAU) if k < 10 else None
        # What the label stage will do with the prefix SE is what every continuation would give.
        if decided is not None:
            assert entropy.label_with_threshold(entropy.discrete_semantic_entropy(ids), TAU) is decided
    # First call: 5 high-temperature samples per question plus the three standard answers.
    assert engine.calls[0] == [5, 5, 5, 1, 1, 1]
    assert all(len(c) <= 3 for c in engine.calls[1:])


def test_round_size_is_a_floor(stage_for):
    stage, engine = stage_for({"confident": ["Paris"] * 10}, round_size=4)
    [row] = stage(pa.table({col.QUESTION: ["confident"]})).to_pylist()
    assert engine.calls == [[5, 1], [4]]  # 5 (the fewest that can decide), then 4 (the floor) not 2
    assert len(row[col.SAMPLES]) == 9 and row[col.NUM_GENERATED] == 10


def test_prefix_ids_are_stable_under_the_greedy_rule():
    """Even with a non-transitive judge, clustering a prefix gives the prefix of the full ids."""
    rng = random.Random(0)
    for _ in range(300):
        m = rng.randint(1, 10)
        same = {(i, j): rng.random() < 0.4 for i in range(m) for j in range(i + 1, m)}
        full = entropy.semantic_ids(m, lambda i, j, same=same: same[(i, j)])
        for k in range(1, m + 1):
            assert entropy.semantic_ids(k, lambda i, j, same=same: same[(i, j)]) == full[:k]


def test_entropy_stage_keeps_upstream_clusters():
    stage = EntropyStage.__new__(EntropyStage)  # no model: the batch brings its clusters
    stage.cfg = EntailmentConfig()
    batch = pa.table(
        {
            col.QUESTION: ["q"],
            col.SAMPLES: [["a", "b", "a"]],
            col.SAMPLE_LOGPROBS: [[-1.0, -2.0, -1.5]],
            col.CLUSTER_IDS: [[0, 1, 0]],
            col.ENTAILMENT_CALLS: [3.0],
        }
    )
    [row] = stage(batch).to_pylist()
    assert row[col.CLUSTER_IDS] == [0, 1, 0] and row[col.ENTAILMENT_CALLS] == 3.0
    assert row[col.SEMANTIC_ENTROPY] == entropy.discrete_semantic_entropy([0, 1, 0])


def test_early_stop_needs_the_judge_config_and_tau():
    cfg = SamplingConfig(early_stop=True)
    with pytest.raises(ValueError, match="entailment"):
        SampleStage(cfg, EnginePool(names=["e"], namespace="t", actors=[object()]))
