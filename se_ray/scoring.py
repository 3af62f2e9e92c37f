"""Continuous abstention scores per evaluated question, the semantic-entropy teacher, and the
certified dial on top of them (``se_ray.risk``).

Scores (higher: more reason to abstain), chosen by ``eval.scores``:

- ``se_score``: semantic entropy of ``sampling.num_samples`` answers of the evaluated model (its
  adapter included) at ``sampling.temperature``, clustered by the configured entailment judge
  with the labeling stage's own functions (``stages.entropy.cluster_questions``, the
  ``se_ray.entropy`` math); discrete SE unless ``labeling.method`` is regular SE. The answer
  the score gates is evaluation's greedy answer: the standard answer's deterministic form.
- ``abstain_logprob``: the teacher-forced log-probability of ``labeling.abstention_text`` after
  the prompt (``EnginePool.continuation_logprobs``), for a tuned model.

The teacher (``--abstain-by semantic_entropy``; method "teacher" in a run's report) abstains
where se_score > τ and otherwise gives the greedy answer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from se_ray import columns as col
from se_ray import entropy, risk
from se_ray.config import EvalConfig, JobConfig
from se_ray.engine import EnginePool, Rejected
from se_ray.prompts import question_messages

if TYPE_CHECKING:
    from se_ray.judges.entailment import EntailmentJudge

logger = logging.getLogger(__name__)

SCORE_COLUMNS = (col.SE_SCORE, col.ABSTAIN_LOGPROB)
TEACHER = "teacher"
ABSTAIN_BY = {"semantic_entropy": col.SE_SCORE}
NAN = float("nan")


def _conversations(rows: Sequence[Mapping[str, Any]], cfg: JobConfig) -> list[list[dict[str, str]]]:
    return [question_messages(r[col.QUESTION], cfg.sampling.answer_style, r.get(col.CONTEXT)) for r in rows]


class Scorer:
    """Computes the configured scores of a list of questions on the evaluated model's engines.

    ``entailment_pool``: the LLM entailment judge's engines (None for the other judges); the judge
    itself is built at the first SE score (``judge``: one already built). ``extra``: scores to
    compute beyond ``eval.scores`` (the teacher needs se_score)."""

    def __init__(
        self,
        cfg: JobConfig,
        entailment_pool: EnginePool | None = None,
        extra: Sequence[str] = (),
        judge: EntailmentJudge | None = None,
    ):
        self.cfg = cfg
        self.names = list(dict.fromkeys([*cfg.eval.scores, *extra]))
        self.entailment_pool = entailment_pool
        self._judge = judge

    def judge(self) -> EntailmentJudge:
        if self._judge is None:
            from se_ray.judges.entailment import build_judge

            self._judge = build_judge(self.cfg.entailment, self.entailment_pool)
        return self._judge

    def score(
        self, rows: Sequence[Mapping[str, Any]], pool: EnginePool, adapter: str | None = None
    ) -> dict[str, list[float]]:
        """Column name -> one score per row (NaN where the engine rejected the row)."""
        out: dict[str, list[float]] = {}
        if col.SE_SCORE in self.names:
            out[col.SE_SCORE] = self.se_scores(rows, pool, adapter)
        if col.ABSTAIN_LOGPROB in self.names:
            text = self.cfg.labeling.abstention_text
            replies = pool.continuation_logprobs(_conversations(rows, self.cfg), text, adapter)
            out[col.ABSTAIN_LOGPROB] = [NAN if isinstance(r, Rejected) else float(r) for r in replies]
        return out

    def se_scores(
        self, rows: Sequence[Mapping[str, Any]], pool: EnginePool, adapter: str | None = None
    ) -> list[float]:
        from se_ray.stages.entropy import cluster_questions
        from se_ray.stages.sample import sampling_params

        s = self.cfg.sampling
        params = sampling_params(s, s.num_samples, s.temperature)
        replies = pool.chat(_conversations(rows, self.cfg), params, adapter)
        todo = [i for i, r in enumerate(replies) if not isinstance(r, Rejected) and r]
        samples = [[c.text for c in replies[i]] for i in todo]  # type: ignore[union-attr]
        clusters = cluster_questions(
            self.judge(), [rows[i][col.QUESTION] for i in todo], samples, self.cfg.entailment.strict
        )
        self.judge().reset_cache()
        scores = [NAN] * len(rows)
        regular = self.cfg.labeling.method == "regular_semantic_entropy"
        for i, ids in zip(todo, clusters, strict=True):
            if regular:
                logprobs = [c.mean_logprob for c in replies[i]]  # type: ignore[union-attr]
                scores[i] = entropy.regular_semantic_entropy(ids, logprobs)
            else:
                scores[i] = entropy.discrete_semantic_entropy(ids)
        return scores


def rule_abstains(score: float | None, tau: float) -> bool:
    """A score rule's abstention: score > τ, and always where there is no score."""
    return score is None or math.isnan(score) or score > tau


def teacher_flags(
    abstained: Sequence[bool], correct: Sequence[bool | None], scores: Sequence[float], tau: float
):
    """The teacher's abstention and correctness from the model's own: abstain where the model
    does or where the score exceeds τ; an abstention has no correctness."""
    out_abstained = [a or rule_abstains(s, tau) for a, s in zip(abstained, scores, strict=True)]
    out_correct = [None if a else c for a, c in zip(out_abstained, correct, strict=True)]
    return out_abstained, out_correct


def risk_inputs(table: Any, score: str) -> dict[str, list]:
    """From a results table (pyarrow): per question the score, whether the model's own answer is
    wrong, whether it gives one (not its own abstention) and whether it is right.

    The model's own answer: ``answer_correct`` where present (null: the model itself abstained),
    else ``abstained`` / ``correct`` (no score rule applied)."""
    d = table.select([c for c in table.column_names if c in _RISK_COLUMNS]).to_pylist()
    if col.ANSWER_CORRECT in table.column_names:
        own = [r[col.ANSWER_CORRECT] for r in d]
        gives = [c is not None for c in own]
    else:
        own = [r[col.CORRECT] for r in d]
        gives = [not r[col.ABSTAINED] for r in d]
    return {
        "scores": [NAN if r.get(score) is None else float(r[score]) for r in d],
        "wrong": [g and c is False for g, c in zip(gives, own, strict=True)],
        "gives_answer": gives,
        "correct": [c is True for c in own],
    }


_RISK_COLUMNS = (col.ABSTAINED, col.CORRECT, col.ANSWER_CORRECT, *SCORE_COLUMNS)


def risk_test_size(cfg: EvalConfig, test: Any | None) -> int | None:
    """The test question count the ``test_split`` guarantee is about; None for ``population``."""
    if cfg.risk_guarantee == "population":
        return None
    if test is None or test.num_rows == 0:
        raise ValueError("eval.risk_guarantee=test_split needs evaluated test questions; there are none")
    return int(test.num_rows)


def certify_score(calibration: Any, test: Any | None, score: str, cfg: EvalConfig) -> dict[str, Any]:
    """One score's certified λ on the calibration results; on the test results its measured risk,
    engagement and AED next to the uncertified λ (the lowest calibration AED) and the oracle λ
    (the lowest test AED: what the guarantee costs)."""
    cal = risk_inputs(calibration, score)
    cert = risk.certify_threshold(
        cal["scores"],
        cal["wrong"],
        cfg.risk_alpha,
        cfg.risk_delta,
        cal["gives_answer"],
        cfg.risk_p_value,
        risk_test_size(cfg, test),
    )
    out: dict[str, Any] = {"score": score, **cert.to_dict()}
    cal_curve, cal_outcomes = _curve(cal)
    out["calibration_curve"] = cal_curve
    if test is None:
        return out
    t = risk_inputs(test, score)

    def on_test(lam: float | None) -> dict[str, float]:
        return risk.rule_outcome(t["scores"], t["wrong"], lam, t["gives_answer"], t["correct"])

    out["test"] = on_test(cert.lam)
    if cal_outcomes:
        lam = cal_curve["lambdas"][_lowest_aed(cal_outcomes)]
        out["uncertified"] = {"lambda": lam, **on_test(lam)}
    test_curve, test_outcomes = _curve(t)
    out["test_curve"] = test_curve
    if test_outcomes:
        lam = test_curve["lambdas"][_lowest_aed(test_outcomes)]
        out["oracle"] = {"lambda": lam, **on_test(lam)}
    return out


def _curve(d: dict[str, list]) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The risk curve over the distinct scores, with each λ's AED."""
    curve = risk.risk_curve(d["scores"], d["wrong"], None, d["gives_answer"])
    outcomes = [
        risk.rule_outcome(d["scores"], d["wrong"], lam, d["gives_answer"], d["correct"])
        for lam in curve.lambdas
    ]
    return {**curve.to_dict(), "aed": [o["aed"] for o in outcomes]}, outcomes


def _lowest_aed(outcomes: Sequence[dict[str, float]]) -> int:
    return min(range(len(outcomes)), key=lambda i: outcomes[i]["aed"])


def certify_results(calibration: Any, test: Any | None, cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """Every score column both tables carry, certified (``certify_score``)."""
    names = [s for s in SCORE_COLUMNS if s in calibration.column_names]
    return {s: certify_score(calibration, test, s, cfg) for s in names}


def risk_summary(certified: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers of one score's certification a verb's JSON summary carries."""
    keys = ("alpha", "delta", "n", "guarantee", "lam", "certified", "engagement", "risk", "message")
    out = {k: certified[k] for k in keys}
    if "test" in certified:
        out["test"] = certified["test"]
    return out
