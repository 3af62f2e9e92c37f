"""Semantic clustering and entropy estimators (pure Python; no ray, torch or vllm).

Discrete semantic entropy (what Tjandra et al. 2024 train with), the Rao-Blackwellised
"regular" semantic entropy of Farquhar et al. (Nature 2024), the exact-string entropy of
R-Tuning-U, the greedy clustering of the reference code (jlko/semantic_uncertainty
``get_semantic_ids``) and bounds that let the sampler stop early once a label is decided.
All logarithms are natural.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Generator, Sequence

__all__ = [
    "cluster_counts",
    "discrete_semantic_entropy",
    "entropy_bounds",
    "exact_entropy",
    "greedy_rounds",
    "label_is_decided",
    "label_with_threshold",
    "logsumexp",
    "normalize_answer",
    "regular_semantic_entropy",
    "semantic_ids",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


# ---------------------------------------------------------------------------- clustering


def surface_key(text: str) -> str:
    """Answers with equal keys are the same text (case and whitespace aside): merged without a
    judge. Stricter than ``normalize_answer``, which would merge "-40" with "40"."""
    return " ".join(text.lower().split())


def greedy_rounds(n: int) -> Generator[list[tuple[int, int]], list[bool], list[int]]:
    """Greedy semantic clustering of ``n`` answers as a coroutine.

    Follows the reference ``get_semantic_ids``: for i = 0..n-1, an answer without an id
    opens class ``next_id`` and is compared with every later answer j > i; each j judged
    equivalent gets ``next_id``, even if an earlier class already claimed it (the
    reference's re-labelling quirk, kept on purpose).

    Each round yields the (i, j) pairs of one opener (never an empty list) and expects,
    through ``send``, one verdict per pair in the same order. The cluster ids, numbered
    0..K-1 in order of opening, are the generator's return value (``StopIteration.value``).
    n = 0 and n = 1 finish without yielding. Driving many questions' generators in lockstep
    lets a caller batch the judge calls across questions.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return _greedy_rounds(n)


def _greedy_rounds(n: int) -> Generator[list[tuple[int, int]], list[bool], list[int]]:
    ids = [-1] * n
    next_id = 0
    for i in range(n):
        if ids[i] != -1:
            continue
        ids[i] = next_id
        pairs = [(i, j) for j in range(i + 1, n)]
        if pairs:
            verdicts = yield pairs
            if verdicts is None or len(verdicts) != len(pairs):
                got = None if verdicts is None else len(verdicts)
                raise ValueError(f"expected {len(pairs)} verdicts for opener {i}, got {got}")
            for (_, j), same in zip(pairs, verdicts, strict=True):
                if same:
                    ids[j] = next_id
        next_id += 1
    return ids


def semantic_ids(n: int, equivalent: Callable[[int, int], bool]) -> list[int]:
    """Cluster ids of ``n`` answers; ``equivalent(i, j)`` judges opener i against later answer j."""
    rounds = greedy_rounds(n)
    try:
        pairs = next(rounds)
        while True:
            pairs = rounds.send([bool(equivalent(i, j)) for i, j in pairs])
    except StopIteration as stop:
        return stop.value


def cluster_counts(cluster_ids: Sequence[int]) -> list[int]:
    """Sizes of the classes, in order of each class's first appearance."""
    return list(Counter(cluster_ids).values())


# ---------------------------------------------------------------------------- entropies


def _entropy_from_counts(counts: Sequence[int]) -> float:
    # Sorting makes the float a function of the partition alone (summation order is fixed),
    # so equal partitions give bit-identical entropies wherever they are computed.
    sizes = sorted((int(c) for c in counts if c), reverse=True)
    if any(c < 0 for c in sizes):
        raise ValueError(f"counts must be non-negative, got {list(counts)}")
    total = sum(sizes)
    if total == 0:
        raise ValueError("entropy of an empty sample is undefined")
    h = -sum((c / total) * math.log(c / total) for c in sizes)
    return h if h > 0.0 else 0.0  # turns -0.0 into 0.0


def discrete_semantic_entropy(cluster_ids: Sequence[int]) -> float:
    """Discrete SE (Tjandra et al. Eq. 6): p(C) = |C| / M, SE = -sum p ln p."""
    if len(cluster_ids) == 0:
        raise ValueError("discrete semantic entropy of zero samples is undefined")
    return _entropy_from_counts(cluster_counts(cluster_ids))


def exact_entropy(answers: Sequence[str]) -> float:
    """Entropy over exact answer strings (after ``strip``): the R-Tuning-U score."""
    if len(answers) == 0:
        raise ValueError("exact entropy of zero answers is undefined")
    return _entropy_from_counts(list(Counter(a.strip() for a in answers).values()))


def logsumexp(values: Sequence[float]) -> float:
    """log(sum(exp(v))), shifted by the maximum; -inf for an empty input or all -inf."""
    if len(values) == 0:
        return -math.inf
    m = max(values)
    if m == -math.inf:
        return -math.inf
    if math.isinf(m) or math.isnan(m):
        return m
    return m + math.log(math.fsum(math.exp(v - m) for v in values))


def regular_semantic_entropy(cluster_ids: Sequence[int], mean_logprobs: Sequence[float]) -> float:
    """Rao-Blackwellised SE (Farquhar et al. 2024), as ``logsumexp_by_id(agg='sum_normalized')``
    followed by ``predictive_entropy_rao`` in the reference code.

    Each sample contributes its mean token log-prob, normalised by the log-sum-exp over all
    samples; a class's log-prob is the log-sum-exp of its members' normalised values, so the
    class probabilities sum to one. Samples with -inf log-prob carry zero mass.
    """
    if len(cluster_ids) == 0:
        raise ValueError("regular semantic entropy of zero samples is undefined")
    if len(cluster_ids) != len(mean_logprobs):
        raise ValueError(f"{len(cluster_ids)} cluster ids but {len(mean_logprobs)} log-probs")
    values = [float(v) for v in mean_logprobs]
    if any(math.isnan(v) or v == math.inf for v in values):
        raise ValueError(f"log-probs must be finite or -inf, got {values}")
    total = logsumexp(values)
    if total == -math.inf:
        raise ValueError("all log-probs are -inf")
    members: dict[int, list[float]] = {}
    for cid, v in zip(cluster_ids, values, strict=True):
        members.setdefault(cid, []).append(v)
    h = 0.0
    for cid in sorted(members):
        # lse(v - total) == lse(v) - total; subtracting after the sum makes a lone class's
        # log-prob exactly 0 (fsum is exactly rounded), so one class gives exactly 0.
        log_p = logsumexp(members[cid]) - total
        if log_p > -math.inf:
            h -= math.exp(log_p) * log_p
    return h if h > 0.0 else 0.0


# ---------------------------------------------------------------------------- labels


def label_with_threshold(score: float, tau: float) -> bool:
    """Abstain (True) iff the score is strictly above tau."""
    return score > tau


def entropy_bounds(counts: Sequence[int], remaining: int) -> tuple[float, float]:
    """Smallest and largest discrete SE reachable once ``remaining`` more samples arrive.

    ``counts`` are the class sizes of the first k samples. Under the greedy rule those
    samples' ids are final: openers only look forward, so a later opener never relabels an
    earlier sample. Each later sample either joins an existing class or lands in a new one,
    so the final partition is the prefix partition with classes grown and classes added.
    - min: all remaining samples join the largest class. Its size vector majorises every
      reachable one (any t classes hold at most the t largest prefix classes plus all
      remaining samples) and entropy is Schur-concave.
    - max: every remaining sample is a new singleton. Every reachable partition coarsens it,
      and merging classes never increases entropy.
    Both are computed with the same function as the final entropy, so a bound equals the
    final value bit for bit when the extreme continuation occurs.
    """
    sizes = [int(c) for c in counts]
    if any(c <= 0 for c in sizes):
        raise ValueError(f"class counts must be positive, got {sizes}")
    if remaining < 0:
        raise ValueError(f"remaining must be non-negative, got {remaining}")
    if not sizes and remaining == 0:
        raise ValueError("no samples and none to come")
    if sizes:
        grown = sorted(sizes, reverse=True)
        grown[0] += remaining
    else:
        grown = [remaining]
    return _entropy_from_counts(grown), _entropy_from_counts(sizes + [1] * remaining)


def label_is_decided(counts: Sequence[int], remaining: int, tau: float) -> bool | None:
    """True if every continuation abstains, False if none does, None while still open."""
    low, high = entropy_bounds(counts, remaining)
    if label_with_threshold(low, tau):
        return True
    if not label_with_threshold(high, tau):
        return False
    return None
