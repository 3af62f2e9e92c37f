"""Tests for se_ray.metrics: answer matching, judge parsing, AED and bootstrap."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from se_ray.metrics import (
    ModelScores,
    aed,
    aurac,
    auroc,
    bootstrap_interval,
    contains_correct,
    contains_match,
    exact_match,
    max_f1,
    oracle_aed,
    parse_yes_no,
    score_answers,
    squad_f1,
)

# ---------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the Eiffel Tower", "Eiffel tower", 1.0),
        ("Eiffel Tower", "The Eiffel Tower.", 1.0),
        ("Paris", "London", 0.0),
        ("in Paris France", "Paris", 2 * (1 / 3) * 1 / (1 / 3 + 1)),
        ("Paris", "Paris France", 2 * 1 * 0.5 / 1.5),
        ("new york new york", "new york", 2 * 0.5 * 1.0 / 1.5),
        ("", "Paris", 0.0),
        ("Paris", "", 0.0),
        ("the", "a", 0.0),  # both normalise to nothing: SQuAD v1.1 scores 0
        ("Barack Obama", "Obama Barack", 1.0),
    ],
)
def test_squad_f1(prediction: str, reference: str, expected: float) -> None:
    assert squad_f1(prediction, reference) == pytest.approx(expected)


def test_max_f1() -> None:
    assert max_f1("Paris", ["London", "Paris, France", "paris"]) == 1.0
    assert max_f1("Paris", ["London", "Paris France"]) == pytest.approx(2 / 3)
    assert max_f1("Paris", []) == 0.0


def test_exact_match() -> None:
    assert exact_match("The Eiffel Tower!", ["eiffel tower"])
    assert exact_match("Paris", ["London", "paris."])
    assert not exact_match("Paris, France", ["Paris"])
    assert not exact_match("Paris", [])
    # Empty references never match, not even an empty prediction.
    assert not exact_match("", [""])
    assert not exact_match("The", ["a"])


def test_contains_match() -> None:
    assert contains_match("It is the Eiffel Tower in Paris.", ["Eiffel Tower"])
    assert contains_match("Paris", ["paris"])
    assert contains_match("The capital is New York City", ["London", "new york"])
    assert not contains_match("Parisian food", ["Paris"])  # whole tokens only
    assert not contains_match("Tower Eiffel", ["Eiffel Tower"])  # order matters
    assert not contains_match("Eiffel big Tower", ["Eiffel Tower"])  # contiguous
    assert not contains_match("Paris", ["", "the", "  "])
    assert not contains_match("", ["Paris"])
    assert not contains_match("Paris", [])


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Yes", True),
        ("yes.", True),
        (" YES, they mean the same.", True),
        ("No", False),
        ("no.", False),
        ("NO, they differ.", False),
        ("Maybe", None),
        ("", None),
        ("Certainly", None),
        ("Yes or no? Yes", True),
        ("I cannot tell", None),  # whole words: 'no' inside 'cannot' is no answer
        ("I don't know", None),
        ("Not really, no.", False),
        ("x" * 40 + " yes", True),  # the whole reply is read, as the reference does
        ("The proposed answer names another city, so no.", False),
    ],
)
def test_parse_yes_no(reply: str, expected: bool | None) -> None:
    assert parse_yes_no(reply) is expected


# ---------------------------------------------------------------------------- AED


def test_aed_never_abstaining_is_one_minus_accuracy() -> None:
    for n, c in [(10, 7), (2500, 1750), (1, 0), (1, 1), (7, 3)]:
        assert aed(n, c, n - c) == pytest.approx(1 - c / n, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10_000).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))))
def test_aed_never_abstaining_identity_property(case: tuple[int, int]) -> None:
    n, c = case
    assert aed(n, c, n - c) == pytest.approx(1 - c / n, abs=1e-12)


def test_aed_always_abstaining() -> None:
    assert aed(2500, 0, 0) == pytest.approx(1 / math.sqrt(2))
    assert aed(1, 0, 0) == pytest.approx(1 / math.sqrt(2))


def test_aed_paper_worked_example() -> None:
    assert round(aed(2500, 1750, 750), 3) == 0.300
    assert round(aed(2500, 7, 3), 3) == 0.705


def test_aed_extremes_and_range() -> None:
    assert aed(10, 10, 0) == 0.0
    assert aed(10, 0, 10) == 1.0
    for c in range(11):
        for i in range(11 - c):
            assert 0.0 <= aed(10, c, i) <= 1.0


@pytest.mark.parametrize(
    ("n", "c", "i"),
    [(0, 0, 0), (-1, 0, 0), (10, -1, 0), (10, 0, -1), (10, 6, 5), (10, 11, 0)],
)
def test_aed_validation(n: int, c: int, i: int) -> None:
    with pytest.raises(ValueError):
        aed(n, c, i)


def test_model_scores() -> None:
    s = ModelScores(num_questions=10, answered=8, correct=5, incorrect=3, abstained=2)
    assert s.accuracy == 0.5
    assert s.engagement == 0.8
    assert s.aed == aed(10, 5, 3)
    d = s.to_dict()
    assert list(d) == [
        "num_questions",
        "answered",
        "correct",
        "incorrect",
        "abstained",
        "accuracy",
        "engagement",
        "aed",
    ]
    assert d["correct"] == 5 and d["abstained"] == 2 and d["aed"] == s.aed
    with pytest.raises(AttributeError):
        s.correct = 6  # type: ignore[misc]


@pytest.mark.parametrize(
    "counts",
    [
        (0, 0, 0, 0, 0),
        (10, 8, 5, 2, 2),  # correct + incorrect != answered
        (10, 8, 5, 3, 1),  # answered + abstained != num_questions
        (10, 11, 11, 0, -1),
        (-2, -1, 0, -1, -1),
    ],
)
def test_model_scores_validation(counts: tuple[int, int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        ModelScores(*counts)


def test_score_answers() -> None:
    abstained = [False, False, True, True, False]
    correct = [True, False, True, False, True]  # the third is ignored: it abstained
    s = score_answers(abstained, correct)
    assert s == ModelScores(num_questions=5, answered=3, correct=2, incorrect=1, abstained=2)
    assert score_answers([True] * 4, [True] * 4).aed == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError):
        score_answers([True], [True, False])
    with pytest.raises(ValueError):
        score_answers([], [])


# ---------------------------------------------------------------------------- bootstrap


def _example(n: int = 200) -> tuple[list[bool], list[bool]]:
    abstained = [k % 5 == 0 for k in range(n)]
    correct = [k % 3 != 0 for k in range(n)]
    return abstained, correct


@pytest.mark.parametrize("metric", ["aed", "accuracy", "engagement"])
def test_bootstrap_interval_contains_point_and_is_deterministic(metric: str) -> None:
    abstained, correct = _example()
    point = getattr(score_answers(abstained, correct), metric)
    low, high = bootstrap_interval(abstained, correct, metric=metric, samples=500, seed=3)
    assert low <= point <= high
    assert low < high
    assert (low, high) == bootstrap_interval(abstained, correct, metric=metric, samples=500, seed=3)
    assert (low, high) != bootstrap_interval(abstained, correct, metric=metric, samples=500, seed=4)


def test_bootstrap_interval_matches_score_answers_on_each_resample() -> None:
    # The vectorised AED equals ModelScores.aed on the same resampled questions.
    import numpy as np

    abstained, correct = _example(50)
    rows = np.random.default_rng(7).integers(0, 50, size=(20, 50))
    values = [score_answers([abstained[k] for k in r], [correct[k] for k in r]).aed for r in rows]
    low, high = bootstrap_interval(abstained, correct, samples=20, seed=7, level=0.5)
    assert (low, high) == pytest.approx(tuple(np.quantile(values, [0.25, 0.75])), abs=1e-12)


def test_bootstrap_interval_narrows_with_level() -> None:
    abstained, correct = _example()
    wide = bootstrap_interval(abstained, correct, level=0.99)
    narrow = bootstrap_interval(abstained, correct, level=0.5)
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]


def test_bootstrap_interval_degenerate_and_invalid() -> None:
    low, high = bootstrap_interval([False] * 5, [True] * 5, samples=0)
    assert math.isnan(low) and math.isnan(high)
    assert bootstrap_interval([False] * 5, [True] * 5) == (0.0, 0.0)  # no variation to resample
    with pytest.raises(ValueError):
        bootstrap_interval([False], [True], metric="f1")
    with pytest.raises(ValueError):
        bootstrap_interval([False], [True], samples=-1)
    with pytest.raises(ValueError):
        bootstrap_interval([False], [True], level=1.0)
    with pytest.raises(ValueError):
        bootstrap_interval([False], [True, False])
    with pytest.raises(ValueError):
        bootstrap_interval([], [])


def test_bootstrap_over_several_models_is_the_interval_of_their_mean() -> None:
    abstained, correct = _example()
    one = bootstrap_interval(abstained, correct, samples=300, seed=1)
    assert bootstrap_interval([abstained], [correct], samples=300, seed=1) == one
    assert bootstrap_interval([abstained] * 3, [correct] * 3, samples=300, seed=1) == pytest.approx(one)
    other = [not a for a in abstained]
    low, high = bootstrap_interval([abstained, other], [correct, correct], samples=300, seed=1)
    points = [score_answers(a, correct).aed for a in (abstained, other)]
    assert low <= sum(points) / 2 <= high
    with pytest.raises(ValueError, match="same list"):
        bootstrap_interval([abstained, abstained[:10]], [correct, correct[:10]])


def test_oracle_aed_answers_exactly_what_the_model_knows() -> None:
    assert oracle_aed(100, 40) == pytest.approx(0.6 / math.sqrt(2))
    assert oracle_aed(10, 10) == 0.0 and oracle_aed(10, 0) == pytest.approx(1 / math.sqrt(2))


@pytest.mark.parametrize(
    ("answer", "references", "expected"),
    [
        ("The capital of France is Paris.", ["Paris"], True),
        ("Paris or Lyon", ["Paris"], False),  # a hedge names several candidates
        ("It is either Paris or Lyon.", ["Paris"], False),
        ("Trinidad and Tobago", ["Trinidad and Tobago"], True),
        ("Port of Spain", ["Port of Spain"], True),
        ("Lyon", ["Paris"], False),
        ("Parisian", ["Paris"], False),
        ("The Isle of Man or Jersey", ["Isle of Man or Jersey"], True),  # the reference itself says "or"
    ],
)
def test_contains_judge_rule(answer: str, references: list[str], expected: bool) -> None:
    assert contains_correct(answer, references) is expected


# ---------------------------------------------------------------------------- labeller diagnostics


def test_auroc_hand_cases() -> None:
    assert auroc([True, True, False, False], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert auroc([True, True, False, False], [0.1, 0.2, 0.9, 0.8]) == 0.0
    assert auroc([True, False], [0.5, 0.5]) == 0.5  # ties count half
    # 3 positives x 2 negatives: pairs won 5, tied 1 -> (5 + 0.5) / 6
    assert auroc([True, True, True, False, False], [0.9, 0.4, 0.3, 0.3, 0.2]) == pytest.approx(5.5 / 6)
    assert math.isnan(auroc([True, True], [0.1, 0.2]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=40))
def test_auroc_is_the_probability_a_positive_outranks_a_negative(rows) -> None:
    pos = [s for y, s in rows if y]
    neg = [s for y, s in rows if not y]
    value = auroc([y for y, _ in rows], [float(s) for _, s in rows])
    if not pos or not neg:
        assert math.isnan(value)
        return
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert value == pytest.approx(wins / (len(pos) * len(neg)))


def test_aurac_follows_the_reference_rule() -> None:
    import numpy as np

    correct = [True, True, False, True, False, False, True, False]
    unc = [0.1, 0.2, 0.9, 0.3, 0.8, 0.7, 0.15, 0.95]
    quantiles = np.linspace(0.1, 1, 20)
    acc, u = np.array(correct, float), np.array(unc)
    expected = sum(acc[u <= np.quantile(u, q)].mean() for q in quantiles) * (quantiles[1] - quantiles[0])
    assert aurac(correct, unc) == pytest.approx(expected)
    # A perfect ranking keeps only right answers at low quantiles: above random ranking.
    assert aurac(correct, unc) > aurac(correct, [0.5] * len(unc))
    assert math.isnan(aurac([], []))
