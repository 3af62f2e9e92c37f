"""The entailment stage on real models: MiniLM (shipped by PyPI) and a tiny random DeBERTa-v2 NLI."""

import shutil

import pyarrow as pa
import pytest

from se_ray import columns as col
from se_ray import entropy
from se_ray.config import EntailmentConfig
from se_ray.entailment import (
    CONTRADICTION,
    ENTAILMENT,
    NEUTRAL,
    EmbeddingJudge,
    EntropyStage,
    NLIJudge,
    Query,
    are_equivalent,
    cluster_questions,
    nli_label_map,
    parse_llm_implication,
)
from se_ray.models import resolve_model


class CountingJudge:
    """Wraps a real judge and records every query it was asked."""

    def __init__(self, inner):
        self.inner = inner
        self.asked: list[Query] = []

    @property
    def model_calls(self):
        return self.inner.model_calls

    def implications(self, queries):
        self.asked += list(queries)
        return self.inner.implications(queries)


@pytest.fixture(scope="module")
def embedding_judge():
    return EmbeddingJudge(EntailmentConfig())


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory):
    """A randomly initialised DeBERTa-v2 classifier with MNLI labels, saved to a folder."""
    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-deberta")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:all-minilm-l6-v2"))
    config = DebertaV2Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=3,
        id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},
        label2id={"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2},
    )
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_equivalence_rules():
    assert are_equivalent(ENTAILMENT, ENTAILMENT, strict=True)
    assert not are_equivalent(ENTAILMENT, NEUTRAL, strict=True)
    assert are_equivalent(ENTAILMENT, NEUTRAL, strict=False)
    assert not are_equivalent(NEUTRAL, NEUTRAL, strict=False)
    assert not are_equivalent(ENTAILMENT, CONTRADICTION, strict=False)


def test_nli_label_map_reads_names():
    assert nli_label_map({0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}) == {0: 0, 1: 1, 2: 2}
    assert nli_label_map({"0": "entailment", "1": "neutral", "2": "contradiction"}) == {0: 2, 1: 1, 2: 0}
    assert nli_label_map({0: "entailment", 1: "not_entailment"}) == {0: 2, 1: 1}
    with pytest.raises(ValueError, match="no entailment label"):
        nli_label_map({0: "LABEL_0", 1: "LABEL_1"})


def test_llm_reply_parsing_follows_the_reference():
    assert parse_llm_implication("Entailment.") == ENTAILMENT
    assert parse_llm_implication(" neutral") == NEUTRAL
    assert parse_llm_implication("Contradiction: no") == CONTRADICTION
    assert parse_llm_implication("I think " + "x" * 40 + " entailment") == NEUTRAL  # only the first 30 chars


def test_embedding_judge_clusters_paraphrases(embedding_judge):
    q = "what is the capital of france"
    answers = ["Paris", "paris.", "Paris, France", "Lyon", "The capital is Paris", "Berlin", "Paris"]
    judge = CountingJudge(embedding_judge)
    [ids] = cluster_questions(judge, [q], [answers], strict=True)
    assert ids[0] == ids[1] == ids[6]  # identical after normalisation: no model call needed
    assert len(set(ids)) >= 2
    assert ids[3] != ids[0] and ids[5] != ids[0]
    # No query compares two answers that normalise to the same text, and no pair is asked twice.
    keys = [
        (entropy.normalize_answer(x.premise), entropy.normalize_answer(x.hypothesis)) for x in judge.asked
    ]
    assert all(a != b for a, b in keys)
    assert len(keys) == len(set(keys))


def test_embedding_judge_embeds_each_unique_text_once(embedding_judge):
    q = "who wrote hamlet"
    answers = ["Shakespeare", "William Shakespeare", "Marlowe", "Ben Jonson", "shakespeare"]
    before = embedding_judge.model_calls
    cluster_questions(embedding_judge, [q], [answers], strict=True)
    assert embedding_judge.model_calls - before <= 4  # 4 unique normalised answers


def test_clustering_matches_the_reference_loop_on_a_real_judge(embedding_judge):
    q = "when did the first man land on the moon"
    answers = ["1969", "July 1969", "In 1969", "1972", "20 July 1969", "It was 1969", "1968"]
    [batched] = cluster_questions(embedding_judge, [q], [answers], strict=True)

    def equivalent(i, j):
        if entropy.normalize_answer(answers[i]) == entropy.normalize_answer(answers[j]):
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
    stage = EntropyStage(EntailmentConfig())
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


def test_nli_judge_code_path_on_a_tiny_random_deberta(tiny_nli):
    cfg = EntailmentConfig(judge="nli", model=str(tiny_nli), model_batch_size=3)
    judge = NLIJudge(cfg)
    queries = [Query("q", "a", "b"), Query("q", "b", "a"), Query("q", "c", "d"), Query("q", "a", "c")]
    verdicts = judge.implications(queries)
    assert len(verdicts) == 4 and set(verdicts) <= {CONTRADICTION, NEUTRAL, ENTAILMENT}
    assert judge.model_calls == 4
    stage = EntropyStage(cfg)
    out = stage(_batch(["q1", "q2"], [["a", "b", "c", "a"], ["x", "y", "z", "w"]])).to_pylist()
    for row in out:
        assert len(row[col.CLUSTER_IDS]) == 4
        assert row[col.SEMANTIC_ENTROPY] == entropy.discrete_semantic_entropy(row[col.CLUSTER_IDS])
    # q1: 3 distinct texts -> at most 3 pairs x 2 directions; q2: at most 6 pairs x 2.
    assert 0 < stage.judge.model_calls <= 2 * (3 + 6)
