"""Stage 6, ``se-ray evaluate``: answer held-out questions greedily, detect abstentions, judge
the rest, score AED. One model: the base model, a LoRA adapter folder served by the base
model's vLLM engine, or any other model folder. ``se-ray run`` reuses ``evaluate_rows``.

Abstentions are detected before judging (``se_ray.abstention.is_abstention``); an abstained answer has
no correctness (null in ``results.parquet``). Questions marked ``answerable: false`` (about
things that do not exist) are never correct: they are scored apart (how often the model
abstains on them) and AED is computed on the answerable questions, as the paper defines it.
Answerable questions without references cannot be judged and go to ``rejects.jsonl``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from se_ray import columns as col
from se_ray import metrics, scoring
from se_ray.abstention import is_abstention
from se_ray.artifacts import read_remote_json
from se_ray.config import JobConfig, SamplingConfig, StorageConfig
from se_ray.engine import EnginePool, Rejected, request_params
from se_ray.judges.correctness import Judge, audit_judges
from se_ray.prompts import question_messages
from se_ray.storage import Store, is_uri

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.parquet"
METRICS_FILE = "metrics.json"
REJECTS_FILE = "rejects.jsonl"
ADAPTER_CONFIG = "adapter_config.json"
RISK_FILE = "risk.json"
CALIBRATION_FOLDER = "calibration"

# LoRA ranks vLLM accepts for max_lora_rank (vllm.config.lora.LoRAConfig).
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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


@dataclass(frozen=True)
class EvalModel:
    """What ``--model`` resolved to: the engine that serves it and the adapter to apply."""

    kind: str  # "base", "adapter" or "model"
    engine: SamplingConfig
    adapter: str | None = None
    name: str = ""


def adapter_config(model: str, storage: StorageConfig | None = None) -> dict[str, Any] | None:
    """The peft ``adapter_config.json`` of the folder ``model`` names (a path or a URI, read where
    it lies: nothing is copied here), None when it is not an adapter folder."""
    if not is_uri(model) and not os.path.isdir(model):
        return None  # a hub id or builtin:...
    return read_remote_json(model, ADAPTER_CONFIG, storage)


def resolve_eval_model(cfg: JobConfig, model: str | None) -> EvalModel:
    """None: the base model. A folder (path or URI) with ``adapter_config.json``: base + that LoRA
    adapter, through the base engine with LoRA serving on. Anything else (a merged model folder,
    a hub id, ``builtin:...``): that model as the engine's model. A URI stays a URI: the engine
    that loads it copies it into its own node's cache."""
    if model is None:
        return EvalModel("base", cfg.sampling, None, cfg.sampling.model)
    ref = model
    if not is_uri(model) and os.path.isdir(os.path.expanduser(model)):
        ref = os.path.abspath(os.path.expanduser(model))
    adapter = adapter_config(ref, cfg.storage)
    if adapter is not None:
        engine = lora_engine_config(cfg.sampling, int(adapter.get("r") or 8))
        return EvalModel("adapter", engine, ref, ref)
    return EvalModel("model", cfg.sampling.model_copy(update={"model": ref}), None, ref)


def answer_questions(
    rows: Sequence[dict[str, Any]], cfg: JobConfig, pool: EnginePool, adapter: str | None = None
) -> list[str | Rejected]:
    """Greedy answers (T = 0) with the sampling prompt style, optionally through a LoRA adapter;
    ``Rejected`` for a question the engine would not take."""
    conversations = [
        question_messages(r[col.QUESTION], cfg.sampling.answer_style, r.get(col.CONTEXT)) for r in rows
    ]
    params = request_params(1, 0.0, cfg.eval.max_tokens or cfg.sampling.max_tokens, cfg.sampling.stop)
    replies = pool.chat(conversations, params, adapter)
    return [r if isinstance(r, Rejected) else r[0].text for r in replies]


@dataclass
class AnswerFlags:
    """Per question, in order: abstained, and correct (None where abstained or unanswerable)."""

    ids: list[str]
    abstained: list[bool]
    correct: list[bool | None]
    answerable: list[bool]

    def answerable_only(self) -> tuple[list[bool], list[bool]]:
        """Abstention and correctness flags of the answerable questions (what AED scores)."""
        keep = [i for i, a in enumerate(self.answerable) if a]
        return [self.abstained[i] for i in keep], [bool(self.correct[i]) for i in keep]

    def to_dict(self) -> dict[str, list]:
        return asdict(self)


def summarize(flags: AnswerFlags, bootstrap_samples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Counts, accuracy, engagement, AED and 95% bootstrap intervals on the answerable questions;
    the abstention rate on the unanswerable ones."""
    abstained, correct = flags.answerable_only()
    scores: dict[str, Any] = metrics.score_answers(abstained, correct).to_dict()
    for name in metrics.METRICS:
        low, high = metrics.bootstrap_interval(abstained, correct, name, samples=bootstrap_samples, seed=seed)
        scores[f"{name}_ci95"] = [low, high]
    scores["oracle_aed"] = metrics.oracle_aed(scores["num_questions"], scores["correct"])
    unanswerable = [a for a, ok in zip(flags.abstained, flags.answerable, strict=True) if not ok]
    scores["unanswerable"] = len(unanswerable)
    scores["unanswerable_abstained"] = sum(unanswerable)
    return scores


def judge_answers(
    judge: Judge, rows: Sequence[dict[str, Any]], answers: Sequence[str], abstention_text: str
) -> AnswerFlags:
    """Abstention flags, and correctness of the answered, answerable questions."""
    abstained = [is_abstention(a, abstention_text) for a in answers]
    answerable = [col.is_answerable(r) for r in rows]
    todo = [i for i, (a, ok) in enumerate(zip(abstained, answerable, strict=True)) if ok and not a]
    verdicts = judge.judge(
        [rows[i][col.QUESTION] for i in todo],
        [answers[i] for i in todo],
        [rows[i][col.REFERENCES] or [] for i in todo],
    )
    correct: list[bool | None] = [
        None if a or ok else False for a, ok in zip(abstained, answerable, strict=True)
    ]
    for i, v in zip(todo, verdicts, strict=True):
        correct[i] = bool(v)
    return AnswerFlags([r[col.ID] for r in rows], abstained, correct, answerable)


def results_table(
    rows: Sequence[dict[str, Any]],
    answers: Sequence[str],
    flags: AnswerFlags,
    judge_name: str,
    scores: dict[str, list[float]] | None = None,
    own_correct: Sequence[bool | None] | None = None,
):
    """``results.parquet``; with ``scores`` also the score columns and ``answer_correct`` (the
    model's own answer judged: ``own_correct``, default ``flags.correct``)."""
    import pyarrow as pa

    table = pa.Table.from_pydict(
        {
            col.ID: flags.ids,
            col.QUESTION: [r[col.QUESTION] for r in rows],
            col.REFERENCES: [r.get(col.REFERENCES) for r in rows],
            col.ANSWER: list(answers),
            col.ABSTAINED: flags.abstained,
            col.CORRECT: flags.correct,
            col.JUDGE: [judge_name] * len(rows),
        },
        schema=col.results_schema(),
    )
    if not scores:
        return table
    extra = {name: (values, pa.float64()) for name, values in scores.items()}
    extra[col.ANSWER_CORRECT] = (list(flags.correct if own_correct is None else own_correct), pa.bool_())
    return col.with_columns(table, extra)


def split_references(rows: Sequence[dict[str, Any]], source: str = "") -> tuple[list[dict], list[dict]]:
    """Rows that can be scored (with references, or unanswerable), and rejects for the rest."""
    keep, rejects = [], []
    for r in rows:
        if col.is_scorable(r):
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


def _engine_reject(row: dict[str, Any], rejected: Rejected) -> dict[str, Any]:
    logger.warning("rejected id %s: %s", row[col.ID], rejected.reason)
    return {"source": "engine", "line": None, "id": row[col.ID], "reason": rejected.reason}


def evaluate_rows(
    cfg: JobConfig,
    rows: Sequence[dict[str, Any]],
    pool: EnginePool,
    judge: Judge,
    out: Store,
    adapter: str | None = None,
    info: dict[str, Any] | None = None,
    scorer: scoring.Scorer | None = None,
    teacher_tau: float | None = None,
) -> tuple[dict[str, Any], AnswerFlags]:
    """Answer, judge and score ``rows``; write ``results.parquet`` and ``metrics.json`` to ``out``.
    Returns the summary and the per-question flags. ``scorer``: the abstention scores to add per
    question; ``teacher_tau``: abstain where se_score > τ (the teacher; needs se_score)."""
    if not any(col.is_answerable(r) for r in rows):
        raise ValueError("nothing to evaluate: no answerable questions with references")
    started = time.perf_counter()
    replies = answer_questions(rows, cfg, pool, adapter)
    answer_s = time.perf_counter() - started
    rejected = [(r, a) for r, a in zip(rows, replies, strict=True) if isinstance(a, Rejected)]
    if rejected:
        out.write_jsonl(
            REJECTS_FILE, out.read_jsonl(REJECTS_FILE) + [_engine_reject(r, a) for r, a in rejected]
        )
        rows = [r for r, a in zip(rows, replies, strict=True) if not isinstance(a, Rejected)]
        replies = [a for a in replies if not isinstance(a, Rejected)]
    answers: list[str] = replies  # type: ignore[assignment]
    flags = judge_answers(judge, rows, answers, cfg.labeling.abstention_text)
    judge_s = time.perf_counter() - started - answer_s
    scores = scorer.score(rows, pool, adapter) if scorer is not None and scorer.names else {}
    own_correct = flags.correct
    if teacher_tau is not None:
        abstained, correct = scoring.teacher_flags(
            flags.abstained, flags.correct, scores[col.SE_SCORE], teacher_tau
        )
        flags = AnswerFlags(flags.ids, abstained, correct, flags.answerable)
    score_s = time.perf_counter() - started - answer_s - judge_s
    measured = summarize(flags, cfg.eval.bootstrap_samples)
    out.makedirs()
    out.write_parquet(RESULTS_FILE, results_table(rows, answers, flags, judge.name, scores, own_correct))
    summary = {
        **(info or {}),
        **measured,
        "scores": sorted(scores),
        "teacher_tau": teacher_tau,
        "judge": judge.name,
        "rejected_by_engine": len(rejected),
        "judge_audit": audit_judges(rows, answers, flags.abstained, cfg.eval),
        "adapter": adapter,
        "answer_s": round(answer_s, 2),
        "judge_s": round(judge_s, 2),
        "score_s": round(score_s, 2),
        "wall_s": round(time.perf_counter() - started, 2),
        "questions_per_s": round(len(rows) / answer_s, 3) if answer_s > 0 else None,
    }
    out.write_json(METRICS_FILE, summary)
    logger.info(
        "evaluated %d questions (%s): %d correct, %d incorrect, %d abstained; AED %.3f [%.3f, %.3f]%s",
        measured["num_questions"],
        (info or {}).get("model", adapter),
        measured["correct"],
        measured["incorrect"],
        measured["abstained"],
        measured["aed"],
        *measured["aed_ci95"],
        f"; abstained on {measured['unanswerable_abstained']} of {measured['unanswerable']} unanswerable"
        if measured["unanswerable"]
        else "",
    )
    return summary, flags


def _scorable_questions(cfg: JobConfig, input: str, out: Store) -> tuple[list[dict[str, Any]], int]:
    """The questions of ``input`` evaluation can score, and how many were rejected (written to
    ``out``'s rejects)."""
    from se_ray.data import InputError, load_questions, require_questions

    loaded = load_questions(input, cfg.data, cfg.storage)
    rows, no_refs = split_references(loaded.rows, input)
    rejects = loaded.rejects + no_refs
    out.makedirs()
    out.write_jsonl(REJECTS_FILE, rejects)
    require_questions(loaded, out.uri(REJECTS_FILE))
    for r in rejects:
        logger.warning("rejected %s line %s id %s: %s", r["source"], r["line"], r["id"], r["reason"])
    if not rows:
        raise InputError(f"input {input}: no questions with references to evaluate")
    return rows, len(rejects)


def evaluate_job(
    cfg: JobConfig,
    model: str | None,
    input: str,
    output: str,
    abstain_by: str | None = None,
    tau: float | None = None,
) -> dict[str, Any]:
    """Evaluate the base model, a LoRA adapter folder or another model on ``input``.

    ``abstain_by="semantic_entropy"``: the teacher (abstain where se_score > τ; τ from ``tau``,
    else ``labeling.tau``). With ``eval.calibration_input`` and scores, each score's threshold is
    certified on those questions (``risk.json``, the summary's ``risk``)."""
    from se_ray.engine import Engines
    from se_ray.judges.correctness import build_judge
    from se_ray.models import check_model

    started = time.perf_counter()
    if abstain_by is not None and abstain_by not in scoring.ABSTAIN_BY:
        raise ValueError(f"--abstain-by {abstain_by}: one of {sorted(scoring.ABSTAIN_BY)}")
    teacher_tau = (cfg.labeling.tau if tau is None else tau) if abstain_by else None
    target = resolve_eval_model(cfg, model)
    check_model(target.engine.model, cfg.storage)  # a missing model fails before any cluster work
    out = Store(output, cfg.storage)
    rows, rejected = _scorable_questions(cfg, input, out)
    calibration = cfg.eval.calibration_input
    cal_out = out.child(CALIBRATION_FOLDER)
    cal_rows = _scorable_questions(cfg, calibration, cal_out)[0] if calibration else []

    info = {"model": target.name, "model_kind": target.kind, "input": input, "rejected": rejected}
    with Engines(cfg, target.engine) as engines:
        judge = build_judge(cfg.eval, engines.correctness_judge_pool(), cfg.sampling.batch_size)
        extra = [scoring.ABSTAIN_BY[abstain_by]] if abstain_by else []
        scorer = scoring.Scorer(cfg, engines.entailment_judge_pool(), extra)
        pool = engines.generation()
        summary, _ = evaluate_rows(
            cfg, rows, pool, judge, out, target.adapter, info, scorer=scorer, teacher_tau=teacher_tau
        )
        if cal_rows and scorer.names:
            cal_info = {**info, "input": calibration}
            evaluate_rows(cfg, cal_rows, pool, judge, cal_out, target.adapter, cal_info, scorer=scorer)
    if cal_rows and scorer.names:
        certified = scoring.certify_results(
            cal_out.read_parquet(RESULTS_FILE), out.read_parquet(RESULTS_FILE), cfg.eval
        )
        out.write_json(RISK_FILE, certified)
        summary["risk"] = {name: scoring.risk_summary(c) for name, c in certified.items()}
    summary["job_wall_s"] = round(time.perf_counter() - started, 2)
    summary["output"] = output
    return summary
