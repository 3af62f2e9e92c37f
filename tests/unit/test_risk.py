"""Learn-then-Test for the risk "answered and wrong" (se_ray.risk)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from se_ray import risk


def test_binomial_tail_by_hand():
    # n = 10, α = 0.2, k = 0: P(Binom(10, 0.2) = 0) = 0.8^10.
    assert risk.binomial_tail_pvalue(0, 10, 0.2) == pytest.approx(0.8**10)
    # k = 1: 0.8^10 + 10 · 0.2 · 0.8^9.
    assert risk.binomial_tail_pvalue(1, 10, 0.2) == pytest.approx(0.8**10 + 10 * 0.2 * 0.8**9)
    assert risk.binomial_tail_pvalue(10, 10, 0.2) == pytest.approx(1.0)
    assert risk.binomial_tail_pvalue(0, 0, 0.2) == 1.0


def test_hoeffding_bentkus_by_hand():
    # k = 0: Hoeffding exp(-n KL(0 || α)) = (1 - α)^n; Bentkus e (1 - α)^n; the min is (1 - α)^n.
    assert risk.hoeffding_bentkus_pvalue(0, 10, 0.2) == pytest.approx(0.8**10)
    # k = 1, n = 10: R̂ = 0.1 < α.
    kl = 0.1 * math.log(0.1 / 0.2) + 0.9 * math.log(0.9 / 0.8)
    bentkus = math.e * (0.8**10 + 10 * 0.2 * 0.8**9)
    assert risk.hoeffding_bentkus_pvalue(1, 10, 0.2) == pytest.approx(min(math.exp(-10 * kl), bentkus))
    # R̂ ≥ α: the Hoeffding term is 1 and Bentkus' e·cdf is capped at 1.
    assert risk.hoeffding_bentkus_pvalue(5, 10, 0.2) == 1.0
    assert risk.hoeffding_bentkus_pvalue(0, 0, 0.2) == 1.0


@pytest.mark.parametrize("n", [5, 40, 300])
def test_binomial_never_above_hoeffding_bentkus(n):
    for k in range(n + 1):
        assert risk.binomial_tail_pvalue(k, n, 0.15) <= risk.hoeffding_bentkus_pvalue(k, n, 0.15) + 1e-12


def test_bernoulli_kl():
    assert risk.bernoulli_kl(0.2, 0.2) == 0.0
    assert risk.bernoulli_kl(0.0, 0.5) == pytest.approx(math.log(2))
    assert risk.bernoulli_kl(1.0, 0.5) == pytest.approx(math.log(2))


def test_unknown_p_value_method():
    with pytest.raises(ValueError):
        risk.p_value(0, 10, 0.1, "nope")  # type: ignore[arg-type]


def test_answered_rule_nan_and_none():
    s = [0.1, float("nan"), 0.5]
    assert risk.answered(s, 0.5).tolist() == [True, False, True]
    assert risk.answered(s, None).tolist() == [False, False, False]


def test_risk_curve_counts_over_all_questions():
    scores = [0.0, 0.0, 1.0, 2.0]
    wrong = [False, True, False, True]
    c = risk.risk_curve(scores, wrong)
    assert c.lambdas == [0.0, 1.0, 2.0]  # ties give one candidate
    assert c.losses == [1, 1, 2]
    assert c.risk == [0.25, 0.25, 0.5]
    assert c.engagement == [0.5, 0.75, 1.0]


def test_gives_answer_false_neither_engages_nor_risks():
    c = risk.risk_curve([0.0, 1.0], [True, True], gives_answer=[False, True])
    assert c.losses == [0, 1]
    assert c.engagement == [0.0, 0.5]


def test_monotone_curve_certifies_the_last_safe_lambda():
    # 100 questions, score i/100; the 20 highest-score answers are wrong.
    scores = np.arange(100) / 100
    wrong = scores >= 0.8
    cert = risk.certify_threshold(scores, wrong, alpha=0.1, delta=0.1)
    assert cert.certified
    # k losses at λ: the largest certifiable k with P(Binom(100, 0.1) <= k) <= 0.1 is 5.
    k_max = max(k for k in range(20) if risk.binomial_tail_pvalue(k, 100, 0.1) <= 0.1)
    assert k_max == 5
    assert cert.lam == pytest.approx(0.8 + (k_max - 1) / 100)
    assert cert.engagement == pytest.approx(0.8 + k_max / 100)
    assert cert.risk == pytest.approx(k_max / 100)
    assert cert.p_value <= 0.1
    # Fixed sequence stopped at the first failing candidate.
    assert cert.tested[-1]["p_value"] > 0.1
    assert all(t["p_value"] <= 0.1 for t in cert.tested[:-1])


def test_non_monotone_error_among_answered():
    # The share wrong *among answered* rises then falls (wrong answers at low scores); the risk
    # over all questions still only grows with λ, so the certified λ is the last candidate
    # before the first failing one, and none after it would pass.
    scores = np.arange(60) / 60
    wrong = np.zeros(60, dtype=bool)
    wrong[[0, 1, 2, 3, 4, 5, 6, 7]] = True
    curve = risk.risk_curve(scores, wrong)
    among = [k / (i + 1) for i, k in enumerate(curve.losses)]
    assert among[0] == 1.0 and among[-1] < 0.2  # not monotone
    assert all(a <= b for a, b in zip(curve.risk, curve.risk[1:], strict=False))
    cert = risk.certify_threshold(scores, wrong, alpha=0.2, delta=0.1)
    first_fail = next(i for i, t in enumerate(cert.tested) if t["p_value"] > 0.1)
    assert cert.lam == cert.tested[first_fail - 1]["lambda"]
    assert all(risk.binomial_tail_pvalue(k, 60, 0.2) > 0.1 for k in curve.losses[first_fail:])


def test_non_monotone_dip_after_certified_region():
    # Safe region, then a burst of wrong answers, then right ones again.
    scores = np.arange(200) / 200
    wrong = np.zeros(200, dtype=bool)
    wrong[100:140] = True
    cert = risk.certify_threshold(scores, wrong, alpha=0.1, delta=0.05)
    assert cert.certified
    assert 0.5 <= cert.lam < 0.7
    k = int(np.sum((scores <= cert.lam) & wrong))
    assert risk.binomial_tail_pvalue(k, 200, 0.1) <= 0.05
    assert risk.binomial_tail_pvalue(k + 1, 200, 0.1) > 0.05


def test_ties_are_answered_together():
    # Five tied scores, one of them wrong: λ = 0 answers all five or none.
    scores = [0.0] * 5 + [1.0] * 45
    wrong = [True] + [False] * 49
    cert = risk.certify_threshold(scores, wrong, alpha=0.2, delta=0.1)
    assert cert.tested[0]["lambda"] == 0.0
    assert cert.tested[0]["losses"] == 1
    assert cert.lam == 1.0
    assert cert.engagement == 1.0


def test_empty_calibration_certifies_nothing():
    cert = risk.certify_threshold([], [], alpha=0.1, delta=0.1)
    assert not cert.certified
    assert cert.n == 0
    assert cert.engagement == 0.0
    assert "abstain on everything" in cert.message


def test_too_few_questions_certify_nothing_even_when_all_right():
    # n = 10, α = 0.2: best p is 0.8^10 ≈ 0.107 > δ = 0.1.
    cert = risk.certify_threshold(np.linspace(0, 1, 10), [False] * 10, alpha=0.2, delta=0.1)
    assert not cert.certified
    assert cert.to_dict()["message"].startswith(risk.NOTHING_CERTIFIED)
    # 11 questions suffice: 0.8^11 ≈ 0.086.
    assert risk.certify_threshold(np.linspace(0, 1, 11), [False] * 11, alpha=0.2, delta=0.1).certified


def test_all_wrong_certifies_nothing():
    # One tied score: the only rule answers all 50, all wrong.
    cert = risk.certify_threshold([1.0] * 50, [True] * 50, alpha=0.1, delta=0.1)
    assert not cert.certified
    assert cert.lam is None
    assert len(cert.tested) == 1
    # Distinct scores: answering only the strictest one (1 wrong in 50) is certified.
    assert risk.certify_threshold(np.arange(50), [True] * 50, alpha=0.1, delta=0.1).engagement == 0.02


def test_nan_scores_never_answer():
    scores = [float("nan")] * 10 + list(np.arange(40) / 40)
    wrong = [True] * 10 + [False] * 40
    cert = risk.certify_threshold(scores, wrong, alpha=0.1, delta=0.1)
    assert cert.certified and cert.risk == 0.0
    assert cert.engagement == pytest.approx(0.8)


def test_invalid_levels():
    with pytest.raises(ValueError):
        risk.certify_threshold([0.0], [False], alpha=0.0, delta=0.1)
    with pytest.raises(ValueError):
        risk.certify_threshold([0.0], [False], alpha=0.1, delta=1.0)
    with pytest.raises(ValueError):
        risk.certify_threshold([0.0, 1.0], [False], alpha=0.1, delta=0.1)


def test_hoeffding_bentkus_certifies_no_more_than_binomial():
    rng = np.random.default_rng(3)
    scores = rng.random(300)
    wrong = rng.random(300) < scores * 0.4
    exact = risk.certify_threshold(scores, wrong, 0.1, 0.1)
    hb = risk.certify_threshold(scores, wrong, 0.1, 0.1, method="hoeffding_bentkus")
    assert exact.certified and hb.certified
    assert hb.lam <= exact.lam


def _draw(rng, n):
    """Score uniform on [0, 1]; the answer is wrong with probability 0.6·score."""
    s = rng.random(n)
    return s, rng.random(n) < 0.6 * s


def _true_risk(lam: float | None) -> float:
    # R(λ) = ∫_0^λ 0.6 s ds = 0.3 λ² (λ ≤ 1).
    return 0.0 if lam is None else 0.3 * min(lam, 1.0) ** 2


@pytest.mark.parametrize("method", ["binomial", "hoeffding_bentkus"])
def test_guarantee_holds_in_simulation(method):
    alpha, delta, n, trials = 0.1, 0.1, 200, 1000
    rng = np.random.default_rng(0)
    exceed = 0
    for _ in range(trials):
        s, w = _draw(rng, n)
        cert = risk.certify_threshold(s, w, alpha, delta, method=method)
        exceed += _true_risk(cert.lam) > alpha
    share = exceed / trials
    se = math.sqrt(delta * (1 - delta) / trials)
    assert share <= delta + 3 * se
    assert share > 0.0 or method == "hoeffding_bentkus"  # exact tail is close to δ, not vacuous


def test_guarantee_on_held_out_test_questions():
    # The measured form (what bench/risk_check.py checks): risk on a fresh test draw.
    alpha, delta, trials = 0.15, 0.1, 500
    rng = np.random.default_rng(1)
    exceed = 0
    for _ in range(trials):
        s, w = _draw(rng, 150)
        cert = risk.certify_threshold(s, w, alpha, delta)
        ts, tw = _draw(rng, 20000)  # large: test risk ≈ true risk
        exceed += risk.rule_outcome(ts, tw, cert.lam)["risk"] > alpha
    assert exceed / trials <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)


def test_hypergeometric_cdf_by_hand():
    # 5 items, 2 successes, 2 drawn: P(X = 0) = C(3, 2) / C(5, 2) = 3/10; P(X ≤ 1) = 9/10.
    assert risk.hypergeometric_cdf(0, 5, 2, 2) == pytest.approx(0.3)
    assert risk.hypergeometric_cdf(1, 5, 2, 2) == pytest.approx(0.9)
    assert risk.hypergeometric_cdf(2, 5, 2, 2) == 1.0
    assert risk.hypergeometric_cdf(-1, 5, 2, 2) == 0.0
    # 4 successes of 5, 3 drawn: at least 2 successes always.
    assert risk.hypergeometric_cdf(1, 5, 4, 3) == 0.0
    assert risk.hypergeometric_cdf(2, 5, 4, 3) == pytest.approx(0.6)  # C(4, 2) C(1, 1) / C(5, 3)


def test_test_split_pvalue_by_hand():
    # n = m = 2, α = 0.4: f = ⌊0.8⌋ = 0, the test exceeds α with one loss.
    # k = 0: the pool's one loss lies in the test with probability 1/2.
    assert risk.test_split_pvalue(0, 2, 2, 0.4) == pytest.approx(0.5)
    # k = 1: two losses in the pool, both in calibration with probability 1/6.
    assert risk.test_split_pvalue(1, 2, 2, 0.4) == pytest.approx(5 / 6)
    assert risk.test_split_pvalue(3, 0, 2, 0.4) == 1.0
    with pytest.raises(ValueError, match="test questions"):
        risk.test_split_pvalue(0, 10, 0, 0.4)


@pytest.mark.parametrize("n", [1, 9, 60])
def test_test_split_pvalue_for_one_test_question_is_conformal(n):
    # m = 1: the test question is a loss with probability (k + 1) / (n + 1).
    for k in range(n + 1):
        assert risk.test_split_pvalue(k, n, 1, 0.15) == pytest.approx((k + 1) / (n + 1))


def test_test_split_pvalue_tends_to_the_binomial_tail():
    for k in (0, 3, 8):
        assert risk.test_split_pvalue(k, 50, 200000, 0.15) == pytest.approx(
            risk.binomial_tail_pvalue(k, 50, 0.15), abs=2e-3
        )


@pytest.mark.parametrize(("n", "m"), [(20, 5), (150, 150), (40, 400)])
def test_test_split_pvalue_never_falls_as_losses_grow(n, m):
    ps = [risk.test_split_pvalue(k, n, m, 0.15) for k in range(n + 1)]
    assert all(a <= b for a, b in zip(ps, ps[1:], strict=False))
    assert ps[-1] == pytest.approx(1.0)


def test_test_split_guarantee_on_random_splits_of_one_pool():
    # What bench/risk_check.py measures: one pool, re-split at random; the test half's own risk.
    alpha, delta, splits = 0.15, 0.1, 800
    rng = np.random.default_rng(2)
    s, w = _draw(rng, 300)
    exceed = {"population": 0, "test_split": 0}
    for _ in range(splits):
        order = rng.permutation(300)
        cal, test = order[:150], order[150:]
        for guarantee, size in (("population", None), ("test_split", 150)):
            cert = risk.certify_threshold(s[cal], w[cal], alpha, delta, test_size=size)
            assert cert.guarantee == guarantee
            exceed[guarantee] += risk.rule_outcome(s[test], w[test], cert.lam)["risk"] > alpha
    assert exceed["test_split"] / splits <= delta + 3 * math.sqrt(delta * (1 - delta) / splits)
    # The population bound is about new questions: on one finite test half it is exceeded more often.
    assert exceed["population"] > exceed["test_split"] > 0


def test_test_split_certification_says_what_it_bounds():
    s, w = _draw(np.random.default_rng(3), 200)
    cert = risk.certify_threshold(s, w, 0.15, 0.1, test_size=50)
    assert cert.certified and cert.to_dict()["guarantee"] == "test_split"
    assert "risk on the 50 test questions ≤ 0.15" in cert.message
    population = risk.certify_threshold(s, w, 0.15, 0.1)
    assert population.to_dict()["guarantee"] == "population"
    models = [_model("a", [True] * 100 + [False] * 100, [False] * 190 + [True] * 10)]
    out = risk.certify_models(models, 0.15, 0.1, test_size=80)
    assert out.chosen == "a" and out.to_dict()["guarantee"] == "test_split"
    assert "test questions" in out.message


def test_rule_outcome_with_aed():
    out = risk.rule_outcome(
        [0.0, 0.5, 1.0, 2.0], [False, True, False, True], 1.0, correct=[True, False, True, False]
    )
    assert out["risk"] == 0.25 and out["engagement"] == 0.75
    assert out["aed"] == pytest.approx(math.sqrt((1 + 4) / 32))
    nothing = risk.rule_outcome([0.0], [True], None, correct=[False])
    assert nothing["risk"] == 0.0 and nothing["engagement"] == 0.0


def _model(name, answered, wrong):
    return risk.ModelCalibration(name, answered, wrong)


def test_certify_models_bonferroni_picks_most_engaged_certified():
    n = 200
    safe_low = _model("tau=0.5", [True] * 100 + [False] * 100, [False] * 200)
    safe_high = _model("tau=1.0", [True] * 160 + [False] * 40, [True] * 10 + [False] * 190)
    risky = _model("tau=2.0", [True] * n, [True] * 60 + [False] * 140)
    out = risk.certify_models([safe_low, safe_high, risky], alpha=0.15, delta=0.1)
    assert out.chosen == "tau=1.0"
    assert out.engagement == pytest.approx(0.8)
    assert out.risk == pytest.approx(0.05)
    assert [m["certified"] for m in out.models] == [True, True, False]
    assert out.n == n
    # Bonferroni: each tested at δ/3.
    p = risk.binomial_tail_pvalue(10, n, 0.15)
    assert out.models[1]["p_value"] == pytest.approx(p) and p <= 0.1 / 3


def test_certify_models_fixed_sequence_stops_at_first_failure():
    a = _model("a", [True] * 100, [True] * 40 + [False] * 60)
    b = _model("b", [True] * 100, [False] * 100)
    seq = risk.certify_models([a, b], 0.15, 0.1, correction="fixed_sequence")
    assert seq.chosen is None and "abstain on everything" in seq.message
    bon = risk.certify_models([a, b], 0.15, 0.1)
    assert bon.chosen == "b"


def test_certify_models_bonferroni_level_matters():
    # p ≈ 0.05: certified at δ = 0.1 alone, not at δ/2.
    n = 100
    k = max(k for k in range(n) if risk.binomial_tail_pvalue(k, n, 0.15) <= 0.1)
    p = risk.binomial_tail_pvalue(k, n, 0.15)
    m = _model("m", [True] * n, [True] * k + [False] * (n - k))
    assert risk.certify_models([m], 0.15, 0.1).chosen == "m"
    if p > 0.05:
        assert (
            risk.certify_models([m, _model("x", [False] * n, [False] * n)], 0.15, 0.1).models[0]["certified"]
            is False
        )


def test_certify_models_edge_cases():
    assert risk.certify_models([], 0.1, 0.1).chosen is None
    with pytest.raises(ValueError):
        risk.certify_models([_model("a", [True], [True, False])], 0.1, 0.1)
    with pytest.raises(ValueError):
        risk.certify_models([_model("a", [True], [False]), _model("b", [True] * 2, [False] * 2)], 0.1, 0.1)


@pytest.mark.parametrize(("n", "p"), [(1, 0.3), (10, 0.2), (57, 0.15), (300, 0.1)])
def test_binomial_cdf_matches_the_sum_of_the_pmf(n, p):
    for k in range(-1, n + 1):
        direct = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert risk.binomial_cdf(k, n, p) == pytest.approx(min(1.0, direct), rel=1e-9, abs=1e-300)
    assert risk.binomial_cdf(0, 5, 0.0) == 1.0 and risk.binomial_cdf(4, 5, 1.0) == 0.0
