"""Entailment judges on real models: MiniLM (shipped by PyPI) and a tiny random DeBERTa-v2 NLI."""

import pytest

from se_ray.config import EntailmentConfig
from se_ray.judges.entailment import (
    CONTRADICTION,
    ENTAILMENT,
    NEUTRAL,
    NLIJudge,
    Query,
    are_equivalent,
    nli_label_map,
    parse_llm_implication,
)


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


def test_nli_judge_code_path_on_a_tiny_random_deberta(tiny_nli):
    cfg = EntailmentConfig(judge="nli", model=str(tiny_nli), model_batch_size=3)
    judge = NLIJudge(cfg)
    queries = [Query("q", "a", "b"), Query("q", "b", "a"), Query("q", "c", "d"), Query("q", "a", "c")]
    verdicts = judge.implications(queries)
    assert len(verdicts) == 4 and set(verdicts) <= {CONTRADICTION, NEUTRAL, ENTAILMENT}
    assert judge.model_calls == 4
