"""A certified abstention dial: Learn-then-Test (Angelopoulos et al. 2021, arXiv 2110.01052) for
the risk "answered and wrong".

Per question a continuous score s (higher: more reason to abstain) and whether the model's own
answer is wrong. The rule at threshold λ answers iff s ≤ λ and abstains otherwise. Its risk is
the share of *all* questions that are answered and wrong (an abstention costs 0), a binomial
risk: on n exchangeable calibration questions the number k of answered-and-wrong ones is
Binomial(n, R(λ)). For each candidate λ the null H_λ: R(λ) > α is tested with a valid p-value:

- ``binomial`` (default): the exact tail P(Binom(n, α) ≤ k). Under H_λ, P(Binom(n, R) ≤ k) ≤
  P(Binom(n, α) ≤ k) for every k, so P(p ≤ δ) ≤ δ: exact for a 0/1 loss, and never larger than
  the Hoeffding–Bentkus p-value's Bentkus term divided by e.
- ``hoeffding_bentkus``: min(exp(−n h(k/n ∧ α, α)), e·P(Binom(n, α) ≤ ⌈k⌉)), h the Bernoulli KL
  divergence; valid for any loss in [0, 1] (LTT's choice), looser here.

Guarantee ``test_split``: the risk on the evaluated test questions themselves (m of them),
when calibration and test are one exchangeable pool of N = n + m split at random (se-ray run's
validation and test splits). Given the pool, the calibration losses are hypergeometric; the
test risk exceeds α iff the test holds ≥ f + 1 losses, f = ⌊αm⌋. The p-value for k calibration
losses is max over j ≤ k of P(Hyp(N, j + f + 1, n) ≤ j). Validity for the chosen λ, not only a
fixed one: the rule certifies λ while the calibration losses stay ≤ k_δ (the largest k whose
p-value is ≤ δ); ordering the pool's wrong answers by score, it exceeds α on the test iff the
(f+1)-th test loss precedes the (k_δ+1)-th calibration loss, i.e. iff the first k_δ + f + 1
losses hold ≤ k_δ calibration ones, probability P(Hyp(N, k_δ + f + 1, n) ≤ k_δ) ≤ δ (with
fewer losses in the pool, the same bound at a smaller k). At m = 1 it is conformal's
(k + 1)/(n + 1); as m grows it tends to the binomial tail. It is what a measured test risk can
check (``bench/risk_check.py``); the population guarantee says nothing about one finite test
split, whose risk scatters around the population's.

Fixed-sequence testing from the most abstaining λ (the candidates are the distinct calibration
scores, strictest first) stops at the first p > δ; every λ tested before it is certified, and
the family-wise error is at most δ without any correction, because the order is fixed before
looking at the losses. The chosen λ is the largest certified one (the most engagement). With
probability ≥ 1 − δ over the calibration draw, the chosen rule's risk on new questions
exchangeable with the calibration ones is ≤ α: marginal over questions, not per question.

A score that is NaN (no score: the engine rejected the question) always abstains. Answering on
nothing has risk 0 and needs no test: it is the fallback when no λ is certified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from se_ray import metrics
from se_ray.risk_pvalues import PValue as PValue
from se_ray.risk_pvalues import bernoulli_kl as bernoulli_kl
from se_ray.risk_pvalues import binomial_cdf as binomial_cdf
from se_ray.risk_pvalues import binomial_tail_pvalue as binomial_tail_pvalue
from se_ray.risk_pvalues import hoeffding_bentkus_pvalue as hoeffding_bentkus_pvalue
from se_ray.risk_pvalues import hypergeometric_cdf as hypergeometric_cdf
from se_ray.risk_pvalues import p_value as p_value
from se_ray.risk_pvalues import test_split_pvalue as test_split_pvalue

Guarantee = Literal["population", "test_split"]
ModelCorrection = Literal["bonferroni", "fixed_sequence"]

NOTHING_CERTIFIED = "no λ certifiable: abstain on everything"


def _arrays(
    scores: Sequence[float], wrong: Sequence[bool], gives_answer: Sequence[bool] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float).reshape(-1)
    w = np.asarray(wrong, dtype=bool).reshape(-1)
    g = np.ones_like(w) if gives_answer is None else np.asarray(gives_answer, dtype=bool).reshape(-1)
    if not (len(s) == len(w) == len(g)):
        raise ValueError(f"{len(s)} scores, {len(w)} wrong flags, {len(g)} answer flags")
    return s, w & g, g


def answered(scores: Sequence[float], lam: float | None) -> np.ndarray:
    """The rule at λ: answer iff score ≤ λ (NaN never answers; λ None answers nothing)."""
    s = np.asarray(scores, dtype=float)
    if lam is None:
        return np.zeros(s.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        return s <= lam


@dataclass(frozen=True)
class RiskCurve:
    """Risk (answered and wrong, over all questions) and engagement (answered) per λ."""

    lambdas: list[float]
    risk: list[float]
    engagement: list[float]
    losses: list[int]
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def risk_curve(
    scores: Sequence[float],
    wrong: Sequence[bool],
    lambdas: Sequence[float] | None = None,
    gives_answer: Sequence[bool] | None = None,
) -> RiskCurve:
    """The curve at ``lambdas`` (default: the distinct finite scores, ascending).

    ``wrong``: the model's own answer is wrong (an unanswerable question answered is wrong).
    ``gives_answer``: False where the model's own answer is already an abstention (it then
    neither engages nor risks anything at any λ); default True everywhere.
    """
    s, w, g = _arrays(scores, wrong, gives_answer)
    lams = candidate_lambdas(s) if lambdas is None else [float(x) for x in lambdas]
    n = len(s)
    finite = ~np.isnan(s)
    order = np.argsort(s[finite], kind="stable")
    sorted_s = s[finite][order]
    wrong_before = np.concatenate([[0], np.cumsum(w[finite][order])])
    engaged_before = np.concatenate([[0], np.cumsum(g[finite][order])])
    answered_count = np.searchsorted(sorted_s, np.asarray(lams, dtype=float), side="right")
    losses = [int(wrong_before[c]) for c in answered_count]
    risks = [k / n if n else 0.0 for k in losses]
    engagement = [int(engaged_before[c]) / n if n else 0.0 for c in answered_count]
    return RiskCurve(lams, risks, engagement, losses, n)


def candidate_lambdas(scores: Sequence[float]) -> list[float]:
    """The distinct finite scores, strictest (fewest answered) first: every rule a threshold can
    make on these questions, ties answered together."""
    s = np.asarray(scores, dtype=float)
    return [float(x) for x in np.unique(s[np.isfinite(s)])]


@dataclass(frozen=True)
class Certification:
    """What Learn-then-Test certified: λ (None: abstain on everything) and what it costs."""

    alpha: float
    delta: float
    n: int
    p_value_method: str
    lam: float | None
    engagement: float
    risk: float
    p_value: float | None
    tested: list[dict[str, float]] = field(default_factory=list)
    test_size: int | None = None

    @property
    def certified(self) -> bool:
        return self.lam is not None

    @property
    def guarantee(self) -> Guarantee:
        return "population" if self.test_size is None else "test_split"

    @property
    def message(self) -> str:
        if self.lam is None:
            return f"{NOTHING_CERTIFIED} (α = {self.alpha:g}, δ = {self.delta:g}, n = {self.n})"
        return (
            f"answer iff score ≤ {self.lam:.4g}: {_risk_phrase(self.test_size)} ≤ {self.alpha:g} with "
            f"probability ≥ {1 - self.delta:g}; calibration engagement {self.engagement:.3f} (n = {self.n})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "certified": self.certified,
            "guarantee": self.guarantee,
            "message": self.message,
        }


def _risk_phrase(test_size: int | None) -> str:
    return "risk" if test_size is None else f"risk on the {test_size} test questions"


def certify_threshold(
    scores: Sequence[float],
    wrong: Sequence[bool],
    alpha: float,
    delta: float,
    gives_answer: Sequence[bool] | None = None,
    method: PValue = "binomial",
    test_size: int | None = None,
) -> Certification:
    """The largest λ certified by fixed-sequence testing from the strictest candidate.

    ``test_size``: certify the risk on that many test questions drawn with the calibration ones
    from one pool (the ``test_split`` guarantee) instead of the risk on new questions."""
    if not (0 < alpha < 1 and 0 < delta < 1):
        raise ValueError(f"alpha and delta must lie in (0, 1), got {alpha}, {delta}")
    curve = risk_curve(scores, wrong, None, gives_answer)
    n = curve.n
    tested: list[dict[str, float]] = []
    best: int | None = None
    for i, (lam, k) in enumerate(zip(curve.lambdas, curve.losses, strict=True)):
        p = p_value(k, n, alpha, method, test_size)
        tested.append({"lambda": lam, "losses": k, "p_value": p})
        if p > delta:
            break
        best = i
    if best is None:
        return Certification(alpha, delta, n, method, None, 0.0, 0.0, None, tested, test_size)
    return Certification(
        alpha,
        delta,
        n,
        method,
        curve.lambdas[best],
        curve.engagement[best],
        curve.risk[best],
        tested[best]["p_value"],
        tested,
        test_size,
    )


@dataclass(frozen=True)
class ModelCalibration:
    """One trained model (one τ) on the calibration questions: which it answered, which wrongly."""

    name: str
    answered: Sequence[bool]
    wrong: Sequence[bool]


@dataclass(frozen=True)
class ModelCertification:
    alpha: float
    delta: float
    n: int
    correction: str
    chosen: str | None
    engagement: float
    risk: float
    models: list[dict[str, Any]]
    test_size: int | None = None

    @property
    def guarantee(self) -> Guarantee:
        return "population" if self.test_size is None else "test_split"

    @property
    def message(self) -> str:
        if self.chosen is None:
            return f"no model certifiable: abstain on everything (α = {self.alpha:g}, δ = {self.delta:g})"
        return (
            f"{self.chosen}: {_risk_phrase(self.test_size)} ≤ {self.alpha:g} with probability ≥ "
            f"{1 - self.delta:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "certified": self.chosen is not None,
            "guarantee": self.guarantee,
            "message": self.message,
        }


def certify_models(
    models: Sequence[ModelCalibration],
    alpha: float,
    delta: float,
    correction: ModelCorrection = "bonferroni",
    method: PValue = "binomial",
    test_size: int | None = None,
) -> ModelCertification:
    """Among fixed models (the τ sweep), the certified one with the highest calibration engagement.

    Each model is one hypothesis H_m: risk_m > α. Default ``bonferroni``: each is tested at δ/K,
    so the family-wise error is ≤ δ for any K models in any order. Chosen over a fixed sequence
    because the sweep's models are trained separately: their risk is not monotone in τ (seeds,
    training noise), and a fixed sequence would stop at the first noisy model and never reach a
    safe, more engaged one; K is the grid size (≤ 9 in the paper's grid), so δ/K costs little.
    ``fixed_sequence`` tests the models in the order given (the caller's a-priori order, e.g.
    ascending τ: most abstaining first) at δ each and stops at the first failure; an order taken
    from the calibration losses would void the guarantee. ``test_size``: as in
    ``certify_threshold``.
    """
    if not (0 < alpha < 1 and 0 < delta < 1):
        raise ValueError(f"alpha and delta must lie in (0, 1), got {alpha}, {delta}")
    level = delta / max(1, len(models)) if correction == "bonferroni" else delta
    rows: list[dict[str, Any]] = []
    n_seen: set[int] = set()
    stopped = False
    for m in models:
        a = np.asarray(m.answered, dtype=bool)
        w = np.asarray(m.wrong, dtype=bool)
        if a.shape != w.shape:
            raise ValueError(f"model {m.name}: {a.size} answered flags, {w.size} wrong flags")
        n = int(a.size)
        n_seen.add(n)
        k = int(np.sum(a & w))
        p = p_value(k, n, alpha, method, test_size)
        ok = p <= level and not stopped
        if correction == "fixed_sequence" and not ok:
            stopped = True
        rows.append(
            {
                "name": m.name,
                "n": n,
                "losses": k,
                "risk": k / n if n else 0.0,
                "engagement": float(np.mean(a)) if n else 0.0,
                "p_value": p,
                "certified": ok,
            }
        )
    if len(n_seen) > 1:
        raise ValueError(f"models calibrated on different question counts: {sorted(n_seen)}")
    certified = [r for r in rows if r["certified"]]
    best = max(certified, key=lambda r: r["engagement"], default=None)
    return ModelCertification(
        alpha,
        delta,
        n_seen.pop() if n_seen else 0,
        correction,
        best["name"] if best else None,
        best["engagement"] if best else 0.0,
        best["risk"] if best else 0.0,
        rows,
        test_size,
    )


def rule_outcome(
    scores: Sequence[float],
    wrong: Sequence[bool],
    lam: float | None,
    gives_answer: Sequence[bool] | None = None,
    correct: Sequence[bool] | None = None,
) -> dict[str, float]:
    """Risk, engagement and (with ``correct``) AED of the rule at λ on a set of questions.

    ``correct``: the model's own answer is right (False where it abstains or is wrong)."""
    s, w, g = _arrays(scores, wrong, gives_answer)
    a = answered(s, lam)
    n = len(s)
    out = {
        "n": n,
        "risk": float(np.sum(a & w)) / n if n else 0.0,
        "engagement": float(np.sum(a & g)) / n if n else 0.0,
    }
    if correct is not None:
        right = int(np.sum(np.asarray(correct, dtype=bool) & a & g))
        out["aed"] = metrics.aed(n, right, int(np.sum(a & w))) if n else float("nan")
    return out
