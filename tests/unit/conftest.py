"""Fixtures shared by the unit tests: real small models, no cluster."""

import shutil

import pytest

from se_ray.config import EntailmentConfig
from se_ray.judges.entailment import NEUTRAL, EmbeddingJudge, Query
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


class NeverEquivalentJudge:
    """Different texts are never equivalent (texts equal up to case and spaces never reach a judge)."""

    def __init__(self):
        self.model_calls = 0

    def implications(self, queries):
        self.model_calls += len(queries)
        return [NEUTRAL] * len(queries)

    def reset_cache(self):
        pass
