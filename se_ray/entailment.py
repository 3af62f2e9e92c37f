"""Cluster + entropy stage: judge entailment between sampled answers, then call the pure math.

The judges score (question, premise, hypothesis) triples in batches; they do not
cluster. The stage de-duplicates identical normalised answers (equivalent without a
model call), drives the reference greedy clustering of every question of a batch in
lockstep (``entropy.greedy_rounds``) so each round is one batched judge call across
questions, expands the unique-answer clusters back to the M samples, and computes the
entropies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from se_ray import columns as col
from se_ray import entropy
from se_ray.config import EntailmentConfig, SamplingConfig
from se_ray.engine import EnginePool
from se_ray.sample import require_columns, with_columns

logger = logging.getLogger(__name__)

CONTRADICTION, NEUTRAL, ENTAILMENT = 0, 1, 2

LLM_ENTAILMENT_PROMPT = (
    'We are evaluating answers to the question "{question}"\n'
    "Here are two possible answers:\n"
    "Possible Answer 1: {text1}\n"
    "Possible Answer 2: {text2}\n"
    "Does Possible Answer 1 semantically entail Possible Answer 2? "
    "Respond only with entailment, contradiction, or neutral.\n"
    "Response:"
)


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
        self.engine = engines.handles()[0]
        self.model_calls = 0

    def implications(self, queries: Sequence[Query]) -> list[int]:
        import ray

        if not queries:
            return []
        conversations = [
            [
                {
                    "role": "user",
                    "content": LLM_ENTAILMENT_PROMPT.format(
                        question=q.question, text1=q.premise, text2=q.hypothesis
                    ),
                }
            ]
            for q in queries
        ]
        params = [dict(n=1, temperature=self.cfg.llm_temperature, max_tokens=self.cfg.llm_max_tokens)]
        replies = ray.get(self.engine.chat.remote(conversations, params * len(conversations)))
        self.model_calls += len(queries)
        return [parse_llm_implication(r[0].text) for r in replies]


def judge_engine_config(cfg: EntailmentConfig, sampling: SamplingConfig) -> SamplingConfig:
    """The engine the LLM judge runs on: the sampling model's engine unless another model is set."""
    if not cfg.model or cfg.model.startswith("builtin:all-minilm"):
        return sampling
    return sampling.model_copy(update={"model": cfg.model, "enable_lora": False, "num_engines": 1})


def build_judge(cfg: EntailmentConfig, engines: EnginePool | None = None) -> EntailmentJudge:
    if cfg.judge == "embedding":
        return EmbeddingJudge(cfg)
    if cfg.judge == "nli":
        return NLIJudge(cfg)
    if engines is None:
        raise ValueError("entailment.judge=llm needs a vLLM engine")
    return LLMJudge(cfg, engines)


def cluster_questions(
    judge: EntailmentJudge,
    questions: Sequence[str],
    samples: Sequence[Sequence[str]],
    strict: bool,
    verdicts: Sequence[dict[tuple[str, str], bool]] | None = None,
) -> list[list[int]]:
    """Reference greedy clustering of each question's M samples, one batched judge call per round.

    Samples with the same normalised text are equivalent without a call, and each unordered
    pair of distinct texts is judged at most once (both directions). The greedy rule still
    runs over all M samples: clustering only the unique texts and expanding can differ from
    the reference when the judge is not transitive.

    ``verdicts``: one cache per question (normalised pair -> equivalent), read and filled, so
    a caller that clusters growing sample lists (early stop) judges each pair once and keeps
    the ids of the earlier samples unchanged.
    """
    keys = [[entropy.normalize_answer(a) for a in answers] for answers in samples]
    if verdicts is None:
        verdicts = [{} for _ in samples]
    elif len(verdicts) != len(samples):
        raise ValueError(f"{len(verdicts)} verdict caches for {len(samples)} questions")
    rounds = [entropy.greedy_rounds(len(k)) for k in keys]
    results: list[list[int] | None] = [None] * len(rounds)
    pending: dict[int, list[tuple[int, int]]] = {}

    def advance(qi: int, sent: list[bool] | None) -> None:
        try:
            pending[qi] = next(rounds[qi]) if sent is None else rounds[qi].send(sent)
        except StopIteration as stop:
            results[qi] = stop.value

    for qi in range(len(rounds)):
        advance(qi, None)
    while pending:
        asked: dict[tuple[int, tuple[str, str]], tuple[str, str]] = {}
        for qi, pairs in pending.items():
            for i, j in pairs:
                a, b = keys[qi][i], keys[qi][j]
                pair = (min(a, b), max(a, b))
                if a == b:
                    verdicts[qi][pair] = True
                elif pair not in verdicts[qi]:
                    asked.setdefault((qi, pair), (samples[qi][i], samples[qi][j]))
        queries = []
        for (qi, _), (first, second) in asked.items():
            queries += [Query(questions[qi], first, second), Query(questions[qi], second, first)]
        implications = judge.implications(queries)
        for n, (qi, pair) in enumerate(asked):
            verdicts[qi][pair] = are_equivalent(implications[2 * n], implications[2 * n + 1], strict)
        current, pending = pending, {}
        for qi, pairs in current.items():
            k = keys[qi]
            advance(qi, [verdicts[qi][(min(k[i], k[j]), max(k[i], k[j]))] for i, j in pairs])
    return [ids or [] for ids in results]


class EntropyStage:
    """``__call__(batch)`` needs ``question``, ``samples``, ``sample_logprobs``; adds clusters and entropies.

    A batch that already carries ``cluster_ids`` (the early-stop sampler clusters while it
    samples, with the same judge settings) keeps them and its ``entailment_calls``: the stage
    then only computes the entropies.
    """

    def __init__(self, cfg: EntailmentConfig, engines: EnginePool | None = None):
        self.cfg = cfg
        self.engines = engines
        self._judge: EntailmentJudge | None = None

    @property
    def judge(self) -> EntailmentJudge:
        """Loaded at the first batch that needs it: early-stop batches arrive clustered."""
        if self._judge is None:
            self._judge = build_judge(self.cfg, self.engines)
        return self._judge

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, "entropy", (col.QUESTION, col.SAMPLES, col.SAMPLE_LOGPROBS))
        questions = batch.column(col.QUESTION).to_pylist()
        samples = batch.column(col.SAMPLES).to_pylist()
        logprobs = batch.column(col.SAMPLE_LOGPROBS).to_pylist()
        f64 = pa.float64()
        if col.CLUSTER_IDS in batch.column_names:
            clusters = batch.column(col.CLUSTER_IDS).to_pylist()
            per_question = (
                batch.column(col.ENTAILMENT_CALLS).to_pylist()
                if col.ENTAILMENT_CALLS in batch.column_names
                else [0.0] * len(questions)
            )
        else:
            calls_before = self.judge.model_calls
            clusters = cluster_questions(self.judge, questions, samples, self.cfg.strict)
            calls = self.judge.model_calls - calls_before
            if isinstance(self.judge, EmbeddingJudge):
                self.judge.reset_cache()
            # The batch's model calls spread over its questions (calls are batched across them).
            per_question = [calls / len(questions)] * len(questions)
        return with_columns(
            batch,
            {
                col.CLUSTER_IDS: (clusters, pa.list_(pa.int64())),
                col.SEMANTIC_ENTROPY: ([entropy.discrete_semantic_entropy(c) for c in clusters], f64),
                col.REGULAR_SEMANTIC_ENTROPY: (
                    [
                        entropy.regular_semantic_entropy(c, lp)
                        for c, lp in zip(clusters, logprobs, strict=True)
                    ],
                    f64,
                ),
                col.EXACT_ENTROPY: ([entropy.exact_entropy(s) for s in samples], f64),
                col.ENTAILMENT_CALLS: (per_question, f64),
            },
        )


def add_entropy_stage(ds, cfg: EntailmentConfig, engines: EnginePool | None = None):
    resources: dict[str, Any] = {"num_cpus": cfg.num_cpus}
    if cfg.num_gpus:
        resources["num_gpus"] = cfg.num_gpus
    return ds.map_batches(
        EntropyStage,
        fn_constructor_kwargs={"cfg": cfg, "engines": engines},
        batch_size=cfg.batch_size,
        concurrency=cfg.num_actors if cfg.max_actors is None else (cfg.num_actors, cfg.max_actors),
        batch_format="pyarrow",
        **resources,
    )
