"""Evaluation math and text rules (pure Python; no ray, torch or vllm).

SQuAD-style answer matching, LLM-judge reply parsing and the
accuracy-engagement distance (AED) of Tjandra et al. 2024 with a bootstrap interval, and the
reference points beside it (the random abstainer at a rate, Cohen's kappa). Abstentions are
recognised in ``se_ray.abstention``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from se_ray.entropy import normalize_answer

__all__ = [
    "METRICS",
    "ModelScores",
    "RandomAbstainer",
    "aed",
    "aurac",
    "auroc",
    "oracle_aed",
    "bootstrap_interval",
    "cohens_kappa",
    "contains_correct",
    "contains_match",
    "exact_match",
    "max_f1",
    "parse_yes_no",
    "random_abstainer",
    "random_abstainer_counts",
    "score_answers",
    "squad_f1",
]

METRICS = ("aed", "accuracy", "engagement")


# ---------------------------------------------------------------------------- text rules


def squad_f1(prediction: str, reference: str) -> float:
    """Token F1 of the SQuAD v1.1 script; an empty side scores 0."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(ref)
    return 2 * precision * recall / (precision + recall)


def max_f1(prediction: str, references: Sequence[str]) -> float:
    """Best F1 over the references (0 for none)."""
    return max((squad_f1(prediction, r) for r in references), default=0.0)


def _normalised_references(references: Sequence[str]) -> list[str]:
    # A reference that normalises to nothing ("The", "?") would match any empty answer.
    return [n for n in (normalize_answer(r) for r in references) if n]


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    """Normalised equality with any non-empty reference."""
    pred = normalize_answer(prediction)
    return any(pred == ref for ref in _normalised_references(references))


def contains_match(prediction: str, references: Sequence[str]) -> bool:
    """A normalised reference occurs as a contiguous run of whole tokens in the prediction."""
    pred = normalize_answer(prediction).split()
    for ref in _normalised_references(references):
        tokens = ref.split()
        width = len(tokens)
        if any(pred[k : k + width] == tokens for k in range(len(pred) - width + 1)):
            return True
    return False


def names_several_candidates(prediction: str, references: Sequence[str]) -> bool:
    """A hedge such as "Paris or Lyon": the answer joins alternatives with "or" (and no
    reference itself does)."""
    if any("or" in r.split() for r in _normalised_references(references)):
        return False
    return "or" in normalize_answer(prediction).split()


def contains_correct(prediction: str, references: Sequence[str]) -> bool:
    """The containment judge: a normalised reference occurs as whole tokens in the answer, and
    the answer does not hedge between candidates."""
    return contains_match(prediction, references) and not names_several_candidates(prediction, references)


def parse_yes_no(reply: str) -> bool | None:
    """Parse an LLM judge's reply as the reference code does, over the whole reply: 'yes'
    anywhere wins, then 'no'; neither gives None. Whole words only, so "not" or "know" is no "no"."""
    words = set(re.findall(r"[a-z]+", reply.lower()))
    if "yes" in words:
        return True
    if "no" in words:
        return False
    return None


# ---------------------------------------------------------------------------- AED


def _aed(num_questions, correct, incorrect):
    # The one AED formula; numpy arrays of counts (the bootstrap) or plain numbers.
    return np.sqrt((incorrect**2 + (num_questions - correct) ** 2) / (2 * num_questions**2))


def aed(num_questions: int, correct: int, incorrect: int) -> float:
    """Accuracy-engagement distance sqrt((I^2 + (|D| - C)^2) / (2 |D|^2)); lower is better."""
    if num_questions <= 0:
        raise ValueError(f"num_questions must be positive, got {num_questions}")
    if correct < 0 or incorrect < 0:
        raise ValueError(f"counts must be non-negative, got correct={correct}, incorrect={incorrect}")
    if correct + incorrect > num_questions:
        raise ValueError(f"correct + incorrect = {correct + incorrect} exceeds {num_questions} questions")
    return float(_aed(num_questions, correct, incorrect))


def oracle_aed(num_questions: int, correct: int) -> float:
    """AED of the oracle abstainer: it answers exactly the questions a model gets right."""
    return aed(num_questions, correct, 0)


@dataclass(frozen=True)
class ModelScores:
    num_questions: int
    answered: int
    correct: int
    incorrect: int
    abstained: int

    def __post_init__(self) -> None:
        counts = (self.num_questions, self.answered, self.correct, self.incorrect, self.abstained)
        if self.num_questions <= 0 or min(counts) < 0:
            raise ValueError(f"invalid counts {self}")
        if self.correct + self.incorrect != self.answered:
            raise ValueError(f"correct + incorrect != answered in {self}")
        if self.answered + self.abstained != self.num_questions:
            raise ValueError(f"answered + abstained != num_questions in {self}")

    @property
    def accuracy(self) -> float:
        return self.correct / self.num_questions

    @property
    def engagement(self) -> float:
        return self.answered / self.num_questions

    @property
    def aed(self) -> float:
        return aed(self.num_questions, self.correct, self.incorrect)

    def to_dict(self) -> dict[str, int | float]:
        return {
            "num_questions": self.num_questions,
            "answered": self.answered,
            "correct": self.correct,
            "incorrect": self.incorrect,
            "abstained": self.abstained,
            "accuracy": self.accuracy,
            "engagement": self.engagement,
            "aed": self.aed,
        }


def _validated(abstained: Sequence[bool], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    if len(abstained) != len(correct):
        raise ValueError(f"{len(abstained)} abstention flags but {len(correct)} correctness flags")
    if len(abstained) == 0:
        raise ValueError("no questions to score")
    answered = ~np.asarray(abstained, dtype=bool)
    return answered, np.asarray(correct, dtype=bool) & answered


def score_answers(abstained: Sequence[bool], correct: Sequence[bool]) -> ModelScores:
    """Counts per question; ``correct`` is ignored where the model abstained."""
    answered, right = _validated(abstained, correct)
    n, a, c = len(answered), int(answered.sum()), int(right.sum())
    return ModelScores(num_questions=n, answered=a, correct=c, incorrect=a - c, abstained=n - a)


def bootstrap_interval(
    abstained: Sequence[bool] | Sequence[Sequence[bool]],
    correct: Sequence[bool] | Sequence[Sequence[bool]],
    metric: str = "aed",
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a metric, resampling questions with replacement.

    One model: flat flag lists. Several models answering the same questions (e.g. seeds): one
    list per model; the questions are resampled jointly, so the interval is that of the mean."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if samples < 0:
        raise ValueError(f"samples must be non-negative, got {samples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    nested = len(abstained) > 0 and not isinstance(abstained[0], (bool, np.bool_))
    models = list(zip(abstained, correct, strict=True)) if nested else [(abstained, correct)]
    if nested and len(abstained) != len(correct):
        raise ValueError("need one correctness list per abstention list")
    flags = [_validated(a, c) for a, c in models]
    n = len(flags[0][0])
    if any(len(answered) != n for answered, _ in flags):
        raise ValueError("every model must answer the same list of questions")
    if samples == 0:
        return math.nan, math.nan
    rows = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    total = np.zeros(samples)
    for answered, right in flags:
        num_answered = answered[rows].sum(axis=1)
        num_correct = right[rows].sum(axis=1)
        if metric == "accuracy":
            total += num_correct / n
        elif metric == "engagement":
            total += num_answered / n
        else:
            total += _aed(n, num_correct, num_answered - num_correct)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(total / len(flags), [tail, 1.0 - tail])
    return float(low), float(high)


# ---------------------------------------------------------------------------- labeller diagnostics


def auroc(positive: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` (ties count half), as sklearn's
    ``roc_curve`` + ``auc`` in the reference code; NaN when one class is missing."""
    y = np.asarray(positive, dtype=bool)
    s = np.asarray(scores, dtype=float)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def aurac(correct: Sequence[bool], uncertainties: Sequence[float]) -> float:
    """Area under the rejection-accuracy curve, as the reference code computes it: the accuracy
    of the answers kept when everything above the q-quantile of uncertainty is rejected, for 20
    quantiles from 0.1 to 1, summed times the quantile step."""
    acc = np.asarray(correct, dtype=float)
    unc = np.asarray(uncertainties, dtype=float)
    if len(acc) == 0:
        return math.nan
    quantiles = np.linspace(0.1, 1, 20)
    kept = [acc[unc <= np.quantile(unc, q)].mean() for q in quantiles]
    return float(np.sum(kept) * (quantiles[1] - quantiles[0]))


# ---------------------------------------------------------------------------- reference points


@dataclass(frozen=True)
class RandomAbstainer:
    """The untuned model's answers with ``abstained`` questions, drawn uniformly at random
    without replacement, replaced by abstentions: expected counts and AED (not sampled)."""

    num_questions: int
    abstained: int  # k: the questions it abstains on (including those the untuned model abstained on)
    rate: float  # the rate asked for; k = round(rate * num_questions)
    expected_correct: float
    expected_incorrect: float
    expected_aed: float  # E[AED] over the draw (exact); AED is not linear, so not the AED of the means
    aed_of_expected_counts: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "num_questions": self.num_questions,
            "abstained": self.abstained,
            "rate": self.rate,
            "correct": self.expected_correct,
            "incorrect": self.expected_incorrect,
            "aed": self.expected_aed,
            "aed_of_expected_counts": self.aed_of_expected_counts,
            "accuracy": self.expected_correct / self.num_questions,
            "engagement": (self.num_questions - self.abstained) / self.num_questions,
        }


def _log_comb(log_factorial: np.ndarray, n: int, k: np.ndarray) -> np.ndarray:
    """log C(n, k) from a table of log factorials; -inf where k lies outside [0, n]."""
    k = np.asarray(k)
    inside = (k >= 0) & (k <= n)
    safe = np.clip(k, 0, n)
    return np.where(inside, log_factorial[n] - log_factorial[safe] - log_factorial[n - safe], -np.inf)


def random_abstainer(abstained: Sequence[bool], correct: Sequence[bool], rate: float) -> RandomAbstainer:
    """Abstaining at random at ``rate`` on the untuned model's answers (its per-question flags).

    k = round(rate * n) (halves up) questions are drawn uniformly without replacement; the others keep the
    untuned model's outcome. The draw takes x of its C right answers, y of its I wrong ones and
    k - x - y of its A abstentions with the multivariate hypergeometric probability
    C(C, x) C(I, y) C(A, k - x - y) / C(n, k); ``expected_aed`` is the exact sum of
    P(x, y) * AED(n, C - x, I - y) over every (x, y). Expected counts: C (1 - k/n), I (1 - k/n)."""
    scores = score_answers(abstained, correct)
    return random_abstainer_counts(scores.num_questions, scores.correct, scores.incorrect, rate)


def random_abstainer_counts(num_questions: int, correct: int, incorrect: int, rate: float) -> RandomAbstainer:
    """``random_abstainer`` from the untuned model's counts (the expectation depends on nothing else)."""
    if not 0.0 <= rate <= 1.0 or math.isnan(rate):
        raise ValueError(f"rate must lie in [0, 1], got {rate}")
    ModelScores(num_questions, correct + incorrect, correct, incorrect, num_questions - correct - incorrect)
    n, c, i = num_questions, correct, incorrect
    a = n - c - i
    k = min(n, math.floor(rate * n + 0.5))  # half up, not Python's round-half-even
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])
    x = np.arange(0, min(c, k) + 1)[:, None]
    y = np.arange(0, min(i, k) + 1)[None, :]
    log_p = (
        _log_comb(log_factorial, c, x)
        + _log_comb(log_factorial, i, y)
        + _log_comb(log_factorial, a, k - x - y)
        - _log_comb(log_factorial, n, np.array(k))
    )
    p = np.exp(log_p)  # exp(-inf) = 0 where k - x - y is out of range
    expected = float(np.sum(p * _aed(n, c - x, i - y)))
    kept = 1.0 - k / n
    return RandomAbstainer(
        num_questions=n,
        abstained=k,
        rate=float(rate),
        expected_correct=c * kept,
        expected_incorrect=i * kept,
        expected_aed=expected,
        aed_of_expected_counts=float(_aed(n, c * kept, i * kept)),
    )


def cohens_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two raters' yes/no calls on the same items (e.g. two models' abstentions):
    (p_o - p_e) / (1 - p_e), with p_o the share of agreement and p_e = p_a p_b + (1 - p_a)(1 - p_b)
    the agreement expected from each rater's own rate. NaN when p_e = 1 (both raters constant and
    equal: kappa is undefined); 0 when either is constant otherwise."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two flag lists of one length, got {x.shape} and {y.shape}")
    if len(x) == 0:
        raise ValueError("no items to compare")
    p_a, p_b = x.mean(), y.mean()
    expected = p_a * p_b + (1 - p_a) * (1 - p_b)
    if expected >= 1.0:
        return math.nan
    return float(((x == y).mean() - expected) / (1 - expected))
