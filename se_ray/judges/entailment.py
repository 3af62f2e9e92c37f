"""Entailment judges: does one answer entail another, as answers to a question? They score
(question, premise, hypothesis) triples in batches; clustering is the entropy stage's."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from se_ray.config import EntailmentConfig
from se_ray.engine import EnginePool, Rejected, request_params
from se_ray.judges.labels import CONTRADICTION, ENTAILMENT, NEUTRAL
from se_ray.prompts import entailment_prompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    """Does ``premise`` entail ``hypothesis``, as answers to ``question``?"""

    question: str
    premise: str
    hypothesis: str


class EntailmentJudge(Protocol):
    model_calls: int  # texts embedded, or pairs classified/prompted, so far

    def implications(self, queries: Sequence[Query]) -> list[int]:
        """CONTRADICTION, NEUTRAL or ENTAILMENT per query, in order."""
        ...

    def reset_cache(self) -> None:
        """Forget what was cached for the questions of a finished batch."""
        ...


def are_equivalent(forward: int, backward: int, strict: bool) -> bool:
    """Strict: both directions entail. Lax (reference non-strict): no contradiction, not both neutral."""
    if strict:
        return forward == ENTAILMENT and backward == ENTAILMENT
    return CONTRADICTION not in (forward, backward) and (forward, backward) != (NEUTRAL, NEUTRAL)


def _conditioned(question: str, answer: str, on_question: bool) -> str:
    return f"{question} {answer}" if on_question else answer


def _device(cfg: EntailmentConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class EmbeddingJudge:
    """Cosine similarity of sentence embeddings (mean pooling, L2-normalised): symmetric, so
    each unique text is embedded once and every pair among them is free."""

    def __init__(self, cfg: EntailmentConfig):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from se_ray.models import resolve_model

        path = resolve_model(cfg.model)
        self.cfg = cfg
        self.device = _device(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.torch = torch
        self._cache: dict[str, np.ndarray] = {}
        self.model_calls = 0

    def _embed(self, texts: list[str]) -> None:
        torch = self.torch
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for start in range(0, len(missing), self.cfg.model_batch_size):
            chunk = missing[start : start + self.cfg.model_batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
            self._cache.update(zip(chunk, pooled, strict=True))
            self.model_calls += len(chunk)

    def implications(self, queries: Sequence[Query]) -> list[int]:
        on_q = self.cfg.condition_on_question
        pairs = [
            (_conditioned(q.question, q.premise, on_q), _conditioned(q.question, q.hypothesis, on_q))
            for q in queries
        ]
        self._embed([t for pair in pairs for t in pair])
        sims = [float(self._cache[a] @ self._cache[b]) for a, b in pairs]
        return [ENTAILMENT if s >= self.cfg.similarity_threshold else NEUTRAL for s in sims]

    def reset_cache(self) -> None:
        self._cache.clear()


class NLIJudge:
    """A sequence-classification NLI model; the entailment/contradiction label ids are read
    from the model config's ``id2label``."""

    def __init__(self, cfg: EntailmentConfig):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from se_ray.models import resolve_model

        path = resolve_model(cfg.model)
        self.cfg = cfg
        self.device = _device(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        self.torch = torch
        self.label_map = nli_label_map(self.model.config.id2label)
        self.model_calls = 0

    def implications(self, queries: Sequence[Query]) -> list[int]:
        on_q = self.cfg.condition_on_question
        out: list[int] = []
        for start in range(0, len(queries), self.cfg.model_batch_size):
            chunk = queries[start : start + self.cfg.model_batch_size]
            enc = self.tokenizer(
                [_conditioned(q.question, q.premise, on_q) for q in chunk],
                [_conditioned(q.question, q.hypothesis, on_q) for q in chunk],
                padding=True,
                truncation=True,
                max_length=512,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with self.torch.inference_mode():
                predicted = self.model(**enc).logits.argmax(-1).tolist()
            out.extend(self.label_map[i] for i in predicted)
            self.model_calls += len(chunk)
        return out

    def reset_cache(self) -> None:
        pass


def nli_label_map(id2label: dict[Any, str]) -> dict[int, int]:
    """Model label id -> CONTRADICTION / NEUTRAL / ENTAILMENT, by label name."""
    mapping: dict[int, int] = {}
    for raw_id, name in id2label.items():
        lowered = name.lower()
        if "entail" in lowered and "not" not in lowered:
            mapping[int(raw_id)] = ENTAILMENT
        elif "contra" in lowered:
            mapping[int(raw_id)] = CONTRADICTION
        else:
            mapping[int(raw_id)] = NEUTRAL
    if ENTAILMENT not in mapping.values():
        raise ValueError(f"NLI model config id2label has no entailment label: {id2label}")
    return mapping


def parse_llm_implication(reply: str) -> int:
    """The reference parsing: look at the first 30 characters, default to neutral."""
    head = reply[:30].lower()
    if "entailment" in head:
        return ENTAILMENT
    if "neutral" in head:
        return NEUTRAL
    if "contradiction" in head:
        return CONTRADICTION
    return NEUTRAL


class LLMJudge:
    """The reference LLM entailment prompt, answered by a vLLM engine actor."""

    def __init__(self, cfg: EntailmentConfig, engines: EnginePool):
        self.cfg = cfg
        self.engines = engines
        self.model_calls = 0

    def implications(self, queries: Sequence[Query]) -> list[int]:
        if not queries:
            return []
        conversations = [
            [{"role": "user", "content": entailment_prompt(q.question, q.premise, q.hypothesis)}]
            for q in queries
        ]
        params = request_params(1, self.cfg.llm_temperature, self.cfg.llm_max_tokens)
        replies = self.engines.chat(conversations, params)
        self.model_calls += len(queries)
        return [NEUTRAL if isinstance(r, Rejected) else parse_llm_implication(r[0].text) for r in replies]

    def reset_cache(self) -> None:
        pass


def build_judge(cfg: EntailmentConfig, engines: EnginePool | None = None) -> EntailmentJudge:
    if cfg.judge == "residual":
        from se_ray.judges.residual import ResidualJudge

        return ResidualJudge()
    if cfg.judge == "embedding":
        return EmbeddingJudge(cfg)
    if cfg.judge == "nli":
        return NLIJudge(cfg)
    if engines is None:
        raise ValueError("entailment.judge=llm needs a vLLM engine")
    return LLMJudge(cfg, engines)
