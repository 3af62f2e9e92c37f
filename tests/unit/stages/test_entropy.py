"""The cluster + entropy stage on real judges (MiniLM shipped by PyPI, a tiny random DeBERTa-v2 NLI)."""

import pyarrow as pa
import pytest

from se_ray import columns as col
from se_ray import entropy
from se_ray.config import EntailmentConfig
from se_ray.judges.entailment import Query, are_equivalent
from se_ray.stages.entropy import EntropyStage, cluster_questions
from tests.unit.conftest import CountingJudge, NeverEquivalentJudge


def test_embedding_judge_clusters_paraphrases(embedding_judge):
    q = "what is the capital of france"
    answers = ["Paris", " paris", "Paris, France", "Lyon", "The capital is Paris", "Berlin", "Paris"]
    judge = CountingJudge(embedding_judge)
    [ids] = cluster_questions(judge, [q], [answers], strict=True)
    assert ids[0] == ids[1] == ids[6]  # equal up to case: no model call needed
    assert len(set(ids)) >= 2
    assert ids[3] != ids[0] and ids[5] != ids[0]
    # No query compares two answers equal up to case and spaces, and no pair is asked twice.
    keys = [(entropy.surface_key(x.premise), entropy.surface_key(x.hypothesis)) for x in judge.asked]
    assert all(a != b for a, b in keys)
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize(
    "pair", [("-40", "40"), ("3.5", "35"), ("About 1.5 million", "About 15 million"), ("Paris.", "Paris")]
)
def test_only_case_and_space_differences_merge_without_a_judge(pair):
    """SQuAD normalisation would merge these (punctuation dropped); the judge must decide them."""
    judge = NeverEquivalentJudge()
    [ids] = cluster_questions(judge, ["q"], [list(pair)], strict=True)
    assert ids == [0, 1] and judge.model_calls == 2
    [ids] = cluster_questions(judge, ["q"], [["Paris", "  PARIS "]], strict=True)
    assert ids == [0, 0]


def test_embedding_judge_embeds_each_unique_text_once(embedding_judge):
    q = "who wrote hamlet"
    answers = ["Shakespeare", "William Shakespeare", "Marlowe", "Ben Jonson", "shakespeare"]
    before = embedding_judge.model_calls
    cluster_questions(embedding_judge, [q], [answers], strict=True)
    assert embedding_judge.model_calls - before <= 4  # 4 texts distinct beyond case


def test_clustering_matches_the_reference_loop_on_a_real_judge(embedding_judge):
    q = "when did the first man land on the moon"
    answers = ["1969", "July 1969", "In 1969", "1972", "20 July 1969", "It was 1969", "1968"]
    [batched] = cluster_questions(embedding_judge, [q], [answers], strict=True)

    def equivalent(i, j):
        if entropy.surface_key(answers[i]) == entropy.surface_key(answers[j]):
            return True
        f, b = embedding_judge.implications(
            [Query(q, answers[i], answers[j]), Query(q, answers[j], answers[i])]
        )
        return are_equivalent(f, b, strict=True)

    assert batched == entropy.semantic_ids(len(answers), equivalent)


def _batch(questions, samples):
    return pa.table(
        {
            col.ID: [f"q{i}" for i in range(len(questions))],
            col.QUESTION: questions,
            col.SAMPLES: samples,
            col.SAMPLE_LOGPROBS: [[-1.0 - 0.1 * k for k in range(len(s))] for s in samples],
        }
    )


def test_entropy_stage_adds_consistent_columns():
    stage = EntropyStage(EntailmentConfig(judge="embedding"))
    out = stage(
        _batch(
            ["who wrote hamlet", "capital of peru"], [["Shakespeare"] * 4, ["Lima", "Cusco", "Lima", "Quito"]]
        )
    )
    rows = out.to_pylist()
    assert rows[0][col.CLUSTER_IDS] == [0, 0, 0, 0] and rows[0][col.SEMANTIC_ENTROPY] == 0.0
    for row in rows:
        assert row[col.SEMANTIC_ENTROPY] == entropy.discrete_semantic_entropy(row[col.CLUSTER_IDS])
        assert row[col.REGULAR_SEMANTIC_ENTROPY] == pytest.approx(
            entropy.regular_semantic_entropy(row[col.CLUSTER_IDS], row[col.SAMPLE_LOGPROBS])
        )
        assert row[col.EXACT_ENTROPY] == entropy.exact_entropy(row[col.SAMPLES])
    assert rows[0][col.ENTAILMENT_CALLS] == rows[1][col.ENTAILMENT_CALLS] > 0


def test_entropy_stage_rejects_missing_columns():
    stage = EntropyStage(EntailmentConfig())
    with pytest.raises(KeyError, match="samples"):
        stage(pa.table({col.QUESTION: ["q"]}))


def test_nli_judge_clusters_in_the_entropy_stage(tiny_nli):
    cfg = EntailmentConfig(judge="nli", model=str(tiny_nli), model_batch_size=3)
    stage = EntropyStage(cfg)
    out = stage(_batch(["q1", "q2"], [["a", "b", "c", "a"], ["x", "y", "z", "w"]])).to_pylist()
    for row in out:
        assert len(row[col.CLUSTER_IDS]) == 4
        assert row[col.SEMANTIC_ENTROPY] == entropy.discrete_semantic_entropy(row[col.CLUSTER_IDS])
    # q1: 3 distinct texts -> at most 3 pairs x 2 directions; q2: at most 6 pairs x 2.
    assert 0 < stage.judge.model_calls <= 2 * (3 + 6)
