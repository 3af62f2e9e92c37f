"""Correctness judges: is an answer right, given its question's references? Each a small class
with ``judge(questions, answers, references) -> list[bool]``:

* ``F1Judge``: max SQuAD F1 >= ``eval.f1_threshold`` (the reference code's default);
* ``ContainsJudge``: a reference occurs as whole tokens in the answer, no hedging;
* ``ExactJudge``: normalised exact match or containment;
* ``LLMJudge``: the reference code's yes/no prompt (multi-reference variant) through a vLLM
  engine; a reply with neither yes nor no is retried once at ``eval.judge_retry_temperature``,
  then counts as no.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from se_ray import metrics
from se_ray.config import EvalConfig
from se_ray.engine import EnginePool, Rejected, request_params
from se_ray.prompts import correctness_prompt

logger = logging.getLogger(__name__)


class Judge(Protocol):
    name: str

    def judge(
        self, questions: Sequence[str], answers: Sequence[str], references: Sequence[Sequence[str]]
    ) -> list[bool]:
        """Whether each answer is correct given its question's references."""
        ...


class F1Judge:
    """Correct when the best SQuAD token F1 against a reference reaches the threshold."""

    name = "f1"

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def judge(
        self, questions: Sequence[str], answers: Sequence[str], references: Sequence[Sequence[str]]
    ) -> list[bool]:
        _check_lengths(questions, answers, references)
        return [metrics.max_f1(a, r) >= self.threshold for a, r in zip(answers, references, strict=True)]


class ContainsJudge:
    """Correct when a normalised reference occurs as whole tokens in the answer ("The capital of
    France is Paris." for "Paris"), unless the answer hedges between candidates ("Paris or
    Lyon"): PopQA's metric, fit for a small model that answers in sentences."""

    name = "contains"

    def judge(
        self, questions: Sequence[str], answers: Sequence[str], references: Sequence[Sequence[str]]
    ) -> list[bool]:
        _check_lengths(questions, answers, references)
        return [metrics.contains_correct(a, r) for a, r in zip(answers, references, strict=True)]


class ExactJudge:
    """Correct on a normalised exact match, or when a reference occurs (as whole tokens) in the answer."""

    name = "exact"

    def judge(
        self, questions: Sequence[str], answers: Sequence[str], references: Sequence[Sequence[str]]
    ) -> list[bool]:
        _check_lengths(questions, answers, references)
        return [
            metrics.exact_match(a, r) or metrics.contains_match(a, r)
            for a, r in zip(answers, references, strict=True)
        ]


def retry_indices(verdicts: Sequence[bool | None]) -> list[int]:
    """Positions whose reply held neither yes nor no: they are asked once more."""
    return [i for i, v in enumerate(verdicts) if v is None]


def combine_verdicts(first: Sequence[bool | None], retried: Sequence[bool | None]) -> list[bool]:
    """First verdicts with the retries (one per ``retry_indices(first)``, in order) filled in;
    still undecided after the retry counts as no, as in the reference code."""
    todo = retry_indices(first)
    if len(todo) != len(retried):
        raise ValueError(f"{len(todo)} undecided verdicts but {len(retried)} retries")
    out = list(first)
    for i, v in zip(todo, retried, strict=True):
        out[i] = v
    return [bool(v) for v in out]


class LLMJudge:
    """The reference yes/no prompt, answered by a vLLM engine (the judge model, or the base model)."""

    name = "llm"

    def __init__(self, cfg: EvalConfig, pool: Any, batch_size: int = 16):
        self.cfg = cfg
        self.pool = pool
        self.batch_size = batch_size
        self.retries = 0
        self.undecided = 0

    def _ask(self, prompts: list[str], temperature: float) -> list[bool | None]:
        if not prompts:
            return []
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        params = request_params(1, temperature, self.cfg.judge_max_tokens)
        replies = self.pool.chat(conversations, params, batch_size=self.batch_size)
        return [None if isinstance(r, Rejected) else metrics.parse_yes_no(r[0].text) for r in replies]

    def judge(
        self, questions: Sequence[str], answers: Sequence[str], references: Sequence[Sequence[str]]
    ) -> list[bool]:
        _check_lengths(questions, answers, references)
        prompts = [
            correctness_prompt(q, a, r) for q, a, r in zip(questions, answers, references, strict=True)
        ]
        first = self._ask(prompts, self.cfg.judge_temperature)
        todo = retry_indices(first)
        retried = self._ask([prompts[i] for i in todo], self.cfg.judge_retry_temperature)
        self.retries += len(todo)
        self.undecided += sum(v is None for v in retried)
        if todo:
            logger.info(
                "LLM judge: %d/%d replies held neither yes nor no; retried, %d still undecided (-> no)",
                len(todo),
                len(prompts),
                sum(v is None for v in retried),
            )
        return combine_verdicts(first, retried)


def _check_lengths(*seqs: Sequence[Any]) -> None:
    if len({len(s) for s in seqs}) > 1:
        raise ValueError(f"judge inputs differ in length: {[len(s) for s in seqs]}")


def build_judge(cfg: EvalConfig, pool: EnginePool | None = None, batch_size: int = 16) -> Judge:
    """The judge named by ``eval.judge``; ``llm`` needs the pool of its engine."""
    if cfg.judge == "f1":
        return F1Judge(cfg.f1_threshold)
    if cfg.judge == "contains":
        return ContainsJudge()
    if cfg.judge == "exact":
        return ExactJudge()
    if pool is None:
        raise ValueError("eval.judge=llm needs a vLLM engine pool")
    return LLMJudge(cfg, pool, batch_size=batch_size)


def audit_judges(
    rows: Sequence[dict[str, Any]],
    answers: Sequence[str],
    abstained: Sequence[bool],
    cfg: EvalConfig,
    examples: int = 3,
) -> dict[str, Any]:
    """How many of the answered questions each model-free judge calls correct, and a few
    answers they disagree on: a reader sees what the choice of judge does to the numbers."""
    judges: list[Judge] = [ContainsJudge(), F1Judge(cfg.f1_threshold), ExactJudge()]
    todo = [i for i, r in enumerate(rows) if not abstained[i] and r.get("references")]
    questions = [rows[i]["question"] for i in todo]
    refs = [rows[i]["references"] for i in todo]
    picked = [answers[i] for i in todo]
    verdicts = {j.name: j.judge(questions, picked, refs) for j in judges}
    disagreements = [
        {"question": questions[k], "answer": picked[k], "references": refs[k]}
        | {name: v[k] for name, v in verdicts.items()}
        for k in range(len(todo))
        if len({v[k] for v in verdicts.values()}) > 1
    ]
    return {
        "answered": len(todo),
        "correct": {name: sum(v) for name, v in verdicts.items()},
        "disagreements": len(disagreements),
        "examples": disagreements[:examples],
    }


def diagnostic_judge(cfg: EvalConfig) -> Judge:
    """The judge of labeller diagnostics: the configured one when it needs no model, else
    containment (labeling holds no judge engine)."""
    return build_judge(cfg) if cfg.judge != "llm" else ContainsJudge()
