"""Valid p-values for the null "risk > α" of a 0/1 loss (the math behind ``se_ray.risk``; see its
docstring for what each one guarantees). Pure: numpy and math only, no scipy."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np

PValue = Literal["binomial", "hoeffding_bentkus"]


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binom(n, p) ≤ k), summed exactly in log space (numpy only: the project has no scipy)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1)
    j = np.arange(1, k + 1)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log((n - j + 1) / j))])  # ln C(n, i)
    log_pmf = log_comb + i * math.log(p) + (n - i) * math.log1p(-p)
    top = float(np.max(log_pmf))
    return float(min(1.0, math.exp(top) * float(np.sum(np.exp(log_pmf - top)))))


def binomial_tail_pvalue(k: int, n: int, alpha: float) -> float:
    """P(Binom(n, α) ≤ k): a valid p-value for H: risk > α given k losses in n (1.0 when n = 0)."""
    if n <= 0:
        return 1.0
    return binomial_cdf(k, n, alpha)


def bernoulli_kl(a: float, b: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(b)) with 0 ln 0 = 0; b in (0, 1)."""
    total = 0.0
    if a > 0:
        total += a * math.log(a / b)
    if a < 1:
        total += (1 - a) * math.log((1 - a) / (1 - b))
    return total


def hoeffding_bentkus_pvalue(k: int, n: int, alpha: float) -> float:
    """LTT's Hoeffding–Bentkus p-value for mean loss k/n against α (1.0 when n = 0)."""
    if n <= 0:
        return 1.0
    risk_hat = k / n
    hoeffding = math.exp(-n * bernoulli_kl(min(risk_hat, alpha), alpha))
    bentkus = math.e * binomial_cdf(math.ceil(k), n, alpha)
    return float(min(1.0, hoeffding, bentkus))


def hypergeometric_cdf(k: int, population: int, successes: int, draws: int) -> float:
    """P(X ≤ k) for X the successes among ``draws`` taken without replacement from
    ``population`` items of which ``successes`` are successes."""
    lo, hi = max(0, draws - (population - successes)), min(draws, successes)
    if k < lo:
        return 0.0
    if k >= hi:
        return 1.0

    def log_comb(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    i = np.arange(lo, k + 1)
    log_pmf = np.array(
        [log_comb(successes, x) + log_comb(population - successes, draws - x) for x in i]
    ) - log_comb(population, draws)
    top = float(np.max(log_pmf))
    return float(min(1.0, math.exp(top) * float(np.sum(np.exp(log_pmf - top)))))


def test_split_losses_allowed(m: int, alpha: float) -> int:
    """f = ⌊αm⌋: the most wrong answers m test questions may hold with risk ≤ α (a hair of
    tolerance so that 0.29 · 100 counts 29, as the rational product does)."""
    return math.floor(alpha * m + 1e-9)


@lru_cache(maxsize=65536)
def test_split_pvalue(k: int, n: int, m: int, alpha: float) -> float:
    """A valid p-value for "the m test questions' risk exceeds α" given k losses in n calibration
    questions, calibration and test drawn at random from one pool (module docstring); running max
    over j ≤ k, so that it never falls as the losses grow. 1.0 when n = 0."""
    if n <= 0:
        return 1.0
    if m <= 0:
        raise ValueError(f"a test-split guarantee needs test questions, got {m}")
    f = test_split_losses_allowed(m, alpha)
    return max(hypergeometric_cdf(j, n + m, j + f + 1, n) for j in range(k + 1))


def p_value(k: int, n: int, alpha: float, method: PValue = "binomial", test_size: int | None = None) -> float:
    """The p-value for H: risk > α; with ``test_size`` the test-split one (``method`` unused)."""
    if test_size is not None:
        return test_split_pvalue(k, n, test_size, alpha)
    if method == "binomial":
        return binomial_tail_pvalue(k, n, alpha)
    if method == "hoeffding_bentkus":
        return hoeffding_bentkus_pvalue(k, n, alpha)
    raise ValueError(f"unknown p-value {method!r}")
