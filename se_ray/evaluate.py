"""Stage 6: answer held-out questions greedily, detect abstentions, judge the rest, score AED.

``se-ray evaluate`` on one model (the base model, a LoRA adapter folder served by the
base model's vLLM engine, or any other model folder), and the building blocks that
``se-ray run`` reuses for the τ sweep and the final comparison:

* ``answer_questions``: greedy answers (T = 0) through the engine pool, with the same chat
  prompt as sampling and training (``se_ray.prompts.question_messages``);
* judges, each a small class with ``judge(questions, answers, references) -> list[bool]``:
  ``F1Judge`` (max SQuAD F1 >= ``eval.f1_threshold``, the reference code's default),
  ``ExactJudge`` (normalised exact match or containment) and ``LLMJudge`` (the reference
  code's yes/no prompt, multi-reference variant, through a vLLM engine; a reply with
  neither yes nor no is retried once at ``eval.judge_retry_temperature``, then counts as no);
* ``summarize``: counts, accuracy, engagement and AED with percentile-bootstrap intervals.

Abstentions are detected before judging (``metrics.is_abstention``); an abstained answer
has no correctness (null in ``results.parquet``). Questions without references cannot be
judged and are rejected into ``rejects.jsonl``.

Importing this module loads no torch, vllm or ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from se_ray import columns as col
from se_ray import metrics
from se_ray.config import EvalConfig, JobConfig, SamplingConfig
from se_ray.prompts import question_messages

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.parquet"
METRICS_FILE = "metrics.json"
REJECTS_FILE = "rejects.jsonl"

# results.parquet columns beyond the question columns
ANSWER = "answer"
ABSTAINED = "abstained"
CORRECT = "correct"
JUDGE = "judge"

# LoRA ranks vLLM accepts for max_lora_rank (vllm.config.lora.LoRAConfig).
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# ---------------------------------------------------------------------------- judges


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


def judge_prompt(question: str, answer: str, references: Sequence[str]) -> str:
    """The reference code's LLM-judge prompt (jlko/semantic_uncertainty ``model_based_metric``),
    with its multi-reference variant when a question has several gold answers."""
    refs = list(references)
    prompt = f"We are assessing the quality of answers to the following question: {question}\n"
    if len(refs) == 1:
        prompt += f"The expected answer is: {refs[0]}.\n"
    else:
        prompt += f"The following are expected answers to this question: {refs}.\n"
    prompt += f"The proposed answer is: {answer}\n"
    if len(refs) == 1:
        prompt += (
            "Within the context of the question, does the proposed answer mean the same as the "
            "expected answer?"
        )
    else:
        prompt += (
            "Within the context of the question, does the proposed answer mean the same as any of the "
            "expected answers?"
        )
    return prompt + " Respond only with yes or no.\nResponse:"


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
        params = dict(n=1, temperature=temperature, max_tokens=self.cfg.judge_max_tokens)
        replies = chat_all(self.pool, conversations, params, adapter=None, batch_size=self.batch_size)
        return [metrics.parse_yes_no(r) for r in replies]

    def judge(
        self, questions: Sequence[str], answers: Sequence[str], references: Sequence[Sequence[str]]
    ) -> list[bool]:
        _check_lengths(questions, answers, references)
        prompts = [judge_prompt(q, a, r) for q, a, r in zip(questions, answers, references, strict=True)]
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


def build_judge(cfg: JobConfig, judge_pool: Any = None) -> Judge:
    """The judge named by ``eval.judge``; ``llm`` needs the pool of its engine."""
    if cfg.eval.judge == "f1":
        return F1Judge(cfg.eval.f1_threshold)
    if cfg.eval.judge == "exact":
        return ExactJudge()
    if judge_pool is None:
        raise ValueError("eval.judge=llm needs a vLLM engine pool")
    return LLMJudge(cfg.eval, judge_pool, batch_size=cfg.sampling.batch_size)


# ---------------------------------------------------------------------------- engines


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds ``rank``."""
    for allowed in _VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {_VLLM_LORA_RANKS[-1]}")


def lora_engine_config(sampling: SamplingConfig, rank: int) -> SamplingConfig:
    """The base model's engine with LoRA serving on, able to load adapters of ``rank``.

    Returned unchanged when the sampling engine already serves such adapters, so labeling,
    the sweep and evaluation share one engine (engines are named by their settings).
    """
    if sampling.enable_lora and sampling.max_lora_rank >= rank:
        return sampling
    return sampling.model_copy(
        update={"enable_lora": True, "max_lora_rank": max(sampling.max_lora_rank, vllm_lora_rank(rank))}
    )


def judge_engine_config(cfg: JobConfig, generation: SamplingConfig) -> SamplingConfig:
    """The engine the LLM judge runs on: the generation engine when it holds the judge model
    (``eval.judge_model``, or the sampling model when empty), else a one-engine copy."""
    model = cfg.eval.judge_model or cfg.sampling.model
    if model == generation.model:
        return generation
    return cfg.sampling.model_copy(
        update={
            "model": model,
            "enable_lora": False,
            "num_engines": 1,
            "tensor_parallel_size": cfg.eval.judge_tensor_parallel_size or cfg.sampling.tensor_parallel_size,
        }
    )


@dataclass(frozen=True)
class EvalModel:
    """What ``--model`` resolved to: the engine that serves it and the adapter to apply."""

    kind: str  # "base", "adapter" or "model"
    engine: SamplingConfig
    adapter: str | None = None
    name: str = ""


def adapter_rank(folder: str) -> int:
    with open(os.path.join(folder, "adapter_config.json")) as f:
        return int(json.load(f).get("r") or 8)


def is_adapter(folder: str | None) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(str(folder), "adapter_config.json"))


def resolve_eval_model(cfg: JobConfig, model: str | None) -> EvalModel:
    """None: the base model. A folder with ``adapter_config.json``: base + that LoRA adapter,
    through the base engine with LoRA serving on. Anything else (a merged model folder, a hub
    id, ``builtin:...``): that model as the engine's model."""
    if model is None:
        return EvalModel("base", cfg.sampling, None, cfg.sampling.model)
    local = os.path.abspath(os.path.expanduser(model))
    if is_adapter(local):
        engine = lora_engine_config(cfg.sampling, adapter_rank(local))
        return EvalModel("adapter", engine, local, local)
    ref = local if os.path.isdir(local) else model
    return EvalModel("model", cfg.sampling.model_copy(update={"model": ref}), None, ref)


def chat_all(
    pool: Any,
    conversations: list[list[dict[str, str]]],
    params: dict[str, Any],
    adapter: str | None,
    batch_size: int,
) -> list[str]:
    """One completion text per conversation: chunks of ``batch_size`` spread over the engines."""
    import ray

    handles = pool.handles()
    if not handles:
        raise RuntimeError("the engine pool holds no engines")
    futures = []
    for k, start in enumerate(range(0, len(conversations), batch_size)):
        chunk = conversations[start : start + batch_size]
        engine = handles[k % len(handles)]
        futures.append(engine.chat.remote(chunk, [params] * len(chunk), adapter))
    texts: list[str] = []
    for result in ray.get(futures):
        texts.extend(completions[0].text for completions in result)
    return texts


def greedy_params(cfg: JobConfig) -> dict[str, Any]:
    return dict(
        n=1,
        temperature=0.0,
        max_tokens=cfg.eval.max_tokens or cfg.sampling.max_tokens,
        stop=list(cfg.sampling.stop),
    )


def answer_questions(
    rows: Sequence[dict[str, Any]], cfg: JobConfig, pool: Any, adapter: str | None = None
) -> list[str]:
    """Greedy answers (T = 0) with the sampling prompt style, optionally through a LoRA adapter."""
    conversations = [
        question_messages(r[col.QUESTION], cfg.sampling.answer_style, r.get(col.CONTEXT)) for r in rows
    ]
    return chat_all(pool, conversations, greedy_params(cfg), adapter, cfg.sampling.batch_size)


# ---------------------------------------------------------------------------- scores


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_mean_interval(
    abstained: Sequence[Sequence[bool]],
    correct: Sequence[Sequence[bool]],
    metric: str = "aed",
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap of a metric averaged over several models (e.g. seeds) answering the
    same questions: the questions are resampled jointly, so the interval is that of the mean."""
    if metric not in metrics.METRICS:
        raise ValueError(f"metric must be one of {metrics.METRICS}, got {metric!r}")
    if not abstained or len(abstained) != len(correct):
        raise ValueError("need one correctness list per abstention list, and at least one model")
    n = len(abstained[0])
    if n == 0 or any(len(a) != n or len(c) != n for a, c in zip(abstained, correct, strict=True)):
        raise ValueError("every model must answer the same, non-empty list of questions")
    if samples == 0:
        return math.nan, math.nan
    rows = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    total = np.zeros(samples)
    for a, c in zip(abstained, correct, strict=True):
        answered = ~np.asarray(a, dtype=bool)
        right = np.asarray(c, dtype=bool) & answered
        num_answered = answered[rows].sum(axis=1)
        num_correct = right[rows].sum(axis=1)
        if metric == "accuracy":
            total += num_correct / n
        elif metric == "engagement":
            total += num_answered / n
        else:
            total += np.sqrt(((num_answered - num_correct) ** 2 + (n - num_correct) ** 2) / (2 * n**2))
    return _percentile_interval(total / len(abstained), level)


def summarize(
    abstained: Sequence[bool], correct: Sequence[bool | None], bootstrap_samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Counts, accuracy (C/|D|), engagement (answered/|D|), AED and their 95% bootstrap intervals."""
    flags = [bool(c) for c in correct]  # None (abstained) counts as not correct
    scores = metrics.score_answers(abstained, flags).to_dict()
    for name in metrics.METRICS:
        low, high = metrics.bootstrap_interval(abstained, flags, name, samples=bootstrap_samples, seed=seed)
        scores[f"{name}_ci95"] = [low, high]
    return scores


def results_table(
    rows: Sequence[dict[str, Any]],
    answers: Sequence[str],
    abstained: Sequence[bool],
    correct: Sequence[bool | None],
    judge_name: str,
):
    import pyarrow as pa

    return pa.table(
        {
            col.ID: pa.array([r[col.ID] for r in rows], pa.string()),
            col.QUESTION: pa.array([r[col.QUESTION] for r in rows], pa.string()),
            col.REFERENCES: pa.array([r.get(col.REFERENCES) for r in rows], pa.list_(pa.string())),
            ANSWER: pa.array(list(answers), pa.string()),
            ABSTAINED: pa.array(list(abstained), pa.bool_()),
            CORRECT: pa.array(list(correct), pa.bool_()),
            JUDGE: pa.array([judge_name] * len(rows), pa.string()),
        }
    )


def judge_answers(
    judge: Judge, rows: Sequence[dict[str, Any]], answers: Sequence[str], abstention_text: str
) -> tuple[list[bool], list[bool | None]]:
    """Abstention flags, and correctness of the answered questions (None where abstained)."""
    abstained = [metrics.is_abstention(a, abstention_text) for a in answers]
    todo = [i for i, a in enumerate(abstained) if not a]
    verdicts = judge.judge(
        [rows[i][col.QUESTION] for i in todo],
        [answers[i] for i in todo],
        [rows[i][col.REFERENCES] or [] for i in todo],
    )
    correct: list[bool | None] = [None] * len(rows)
    for i, v in zip(todo, verdicts, strict=True):
        correct[i] = bool(v)
    return abstained, correct


def split_references(rows: Sequence[dict[str, Any]], source: str = "") -> tuple[list[dict], list[dict]]:
    """Rows with references, and rejects for those without (evaluation needs references)."""
    keep, rejects = [], []
    for r in rows:
        if r.get(col.REFERENCES):
            keep.append(r)
        else:
            rejects.append(
                {
                    "source": source,
                    "line": None,
                    "id": r[col.ID],
                    "reason": "no references: evaluation needs them",
                }
            )
    return keep, rejects


def evaluate_rows(
    cfg: JobConfig,
    rows: Sequence[dict[str, Any]],
    pool: Any,
    judge: Judge,
    output: str,
    adapter: str | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Answer, judge and score ``rows`` (all with references); write results + metrics to ``output``."""
    from se_ray.storage import filesystem, join, write_json, write_parquet_atomic

    if not rows:
        raise ValueError("nothing to evaluate: no questions with references")
    started = time.perf_counter()
    answers = answer_questions(rows, cfg, pool, adapter)
    answer_s = time.perf_counter() - started
    abstained, correct = judge_answers(judge, rows, answers, cfg.labeling.abstention_text)
    judge_s = time.perf_counter() - started - answer_s
    scores = summarize(abstained, correct, cfg.eval.bootstrap_samples)
    fs, out = filesystem(output, cfg.storage)
    fs.create_dir(out, recursive=True)
    write_parquet_atomic(
        fs, join(out, RESULTS_FILE), results_table(rows, answers, abstained, correct, judge.name)
    )
    wall = time.perf_counter() - started
    summary = {
        **(info or {}),
        **scores,
        "judge": judge.name,
        "adapter": adapter,
        "answer_s": round(answer_s, 2),
        "judge_s": round(judge_s, 2),
        "wall_s": round(wall, 2),
        "questions_per_s": round(len(rows) / answer_s, 3) if answer_s > 0 else None,
    }
    write_json(fs, join(out, METRICS_FILE), summary)
    logger.info(
        "evaluated %d questions (%s): %d correct, %d incorrect, %d abstained; AED %.3f [%.3f, %.3f]",
        scores["num_questions"],
        info.get("model") if info else adapter,
        scores["correct"],
        scores["incorrect"],
        scores["abstained"],
        scores["aed"],
        *scores["aed_ci95"],
    )
    return summary


def read_results(fs: Any, folder: str):
    """The ``results.parquet`` table of an evaluation folder."""
    import pyarrow.parquet as pq

    from se_ray.storage import join

    return pq.read_table(join(folder, RESULTS_FILE), filesystem=fs)


def evaluate_job(cfg: JobConfig, model: str | None, input: str, output: str) -> dict[str, Any]:
    """Evaluate the base model, a LoRA adapter folder or another model on ``input``."""
    from se_ray.data import InputError, load_questions
    from se_ray.engine import acquire_engines
    from se_ray.models import resolve_model
    from se_ray.runtime import ensure_ray
    from se_ray.storage import filesystem, join, write_text_atomic

    started = time.perf_counter()
    target = resolve_eval_model(cfg, model)
    resolve_model(target.engine.model)  # a missing model folder fails before any cluster work
    loaded = load_questions(input, cfg.data, cfg.storage)
    rows, no_refs = split_references(loaded.rows, input)
    rejects = loaded.rejects + no_refs
    fs, out = filesystem(output, cfg.storage)
    fs.create_dir(out, recursive=True)
    write_text_atomic(
        fs, join(out, REJECTS_FILE), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    )
    for r in rejects:
        logger.warning("rejected %s line %s id %s: %s", r["source"], r["line"], r["id"], r["reason"])
    if not rows:
        raise InputError(f"input {input}: no questions with references to evaluate")

    ensure_ray(cfg.ray)
    pools = [acquire_engines(target.engine, cfg.ray)]
    try:
        judge_pool = None
        if cfg.eval.judge == "llm":
            judge_cfg = judge_engine_config(cfg, target.engine)
            judge_pool = pools[0] if judge_cfg is target.engine else acquire_engines(judge_cfg, cfg.ray)
            if judge_pool is not pools[0]:
                pools.append(judge_pool)
        judge = build_judge(cfg, judge_pool)
        summary = evaluate_rows(
            cfg,
            rows,
            pools[0],
            judge,
            output,
            adapter=target.adapter,
            info={"model": target.name, "model_kind": target.kind, "input": input, "rejected": len(rejects)},
        )
    finally:
        for pool in pools:
            pool.release()
    summary["job_wall_s"] = round(time.perf_counter() - started, 2)
    summary["output"] = output
    return summary


__all__ = [
    "ExactJudge",
    "F1Judge",
    "Judge",
    "LLMJudge",
    "answer_questions",
    "bootstrap_mean_interval",
    "build_judge",
    "combine_verdicts",
    "evaluate_job",
    "evaluate_rows",
    "judge_answers",
    "judge_prompt",
    "lora_engine_config",
    "resolve_eval_model",
    "retry_indices",
    "summarize",
]
