"""Evaluation math and text rules (pure Python; no ray, torch or vllm).

Abstention detection, SQuAD-style answer matching, LLM-judge reply parsing and the
accuracy-engagement distance (AED) of Tjandra et al. 2024 with a bootstrap interval.
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
    "DEFAULT_ABSTENTION_TEXT",
    "METRICS",
    "ModelScores",
    "aed",
    "aurac",
    "auroc",
    "oracle_aed",
    "bootstrap_interval",
    "contains_correct",
    "contains_match",
    "exact_match",
    "is_abstention",
    "max_f1",
    "parse_yes_no",
    "score_answers",
    "squad_f1",
]

DEFAULT_ABSTENTION_TEXT = "I don't know the answer."
# Normalised forms: punctuation (the apostrophe too) is dropped, so "don't" becomes "dont".
_ABSTENTION_PHRASES = (("i", "dont", "know"), ("i", "do", "not", "know"))
# Words after "I don't know" that show the answer still commits to a candidate
# ("I don't know exactly, but it was 1066.").
_COMMITTING_WORDS = frozenset(
    {
        "but",
        "however",
        "though",
        "although",
        "think",
        "believe",
        "guess",
        "probably",
        "perhaps",
        "maybe",
        "likely",
        "possibly",
    }
)
METRICS = ("aed", "accuracy", "engagement")


# ---------------------------------------------------------------------------- text rules


def _ascii_apostrophes(text: str) -> str:
    # string.punctuation is ASCII only, so "don’t" would otherwise survive as one token.
    return text.replace("\u2019", "'").replace("\u2018", "'")


def is_abstention(answer: str, abstention_text: str = DEFAULT_ABSTENTION_TEXT) -> bool:
    """Whether an answer abstains: it starts (token-wise, after SQuAD normalisation) with the
    configured text, "I don't know" or "I do not know", and does not go on to commit to a
    candidate ("..., but it was 1066", "... I think it is Paris")."""
    tokens = normalize_answer(_ascii_apostrophes(answer)).split()
    phrases = list(_ABSTENTION_PHRASES)
    configured = tuple(normalize_answer(_ascii_apostrophes(abstention_text)).split())
    if configured:
        phrases.append(configured)
    for phrase in phrases:
        if tuple(tokens[: len(phrase)]) == phrase:
            return not _COMMITTING_WORDS.intersection(tokens[len(phrase) :])
    return False


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
