"""Tests for the reference points in se_ray.metrics: the random abstainer at a rate and Cohen's kappa."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from se_ray.metrics import aed, cohens_kappa, random_abstainer


def _brute_force(abstained: list[bool], correct: list[bool], k: int) -> tuple[float, float, float]:
    """Mean correct, incorrect and AED over every k-subset of questions to abstain on."""
    n = len(abstained)
    rows = []
    for chosen in itertools.combinations(range(n), k):
        answered = [not abstained[q] and q not in chosen for q in range(n)]
        c = sum(a and correct[q] for q, a in enumerate(answered))
        i = sum(a and not correct[q] for q, a in enumerate(answered))
        rows.append((c, i, aed(n, c, i)))
    return tuple(float(np.mean([r[j] for r in rows])) for j in range(3))


def test_hand_computed_two_right_two_wrong_half() -> None:
    # 6 ways to abstain on 2 of 4: {both right} -> C0 I2, {both wrong} -> C2 I0, 4 mixed -> C1 I1.
    r = random_abstainer([False] * 4, [True, True, False, False], 0.5)
    expected = (math.sqrt(20 / 32) + math.sqrt(4 / 32) + 4 * math.sqrt(10 / 32)) / 6
    assert r.abstained == 2
    assert r.expected_correct == pytest.approx(1.0)
    assert r.expected_incorrect == pytest.approx(1.0)
    assert r.expected_aed == pytest.approx(expected)
    assert r.aed_of_expected_counts == pytest.approx(math.sqrt(10 / 32))
    assert r.expected_aed > r.aed_of_expected_counts  # AED is convex: not the AED of the means


def test_untuned_abstentions_count_among_the_draw() -> None:
    # n=4: one right, two wrong, one abstained; abstain on 2. Draws (6): the abstained question with
    # the right one (C0 I2), with a wrong one (x2: C1 I1), right+wrong (x2: C0 I1), wrong+wrong (C1 I0).
    r = random_abstainer([False, False, False, True], [True, False, False, False], 0.5)
    a = [aed(4, 0, 2), aed(4, 1, 1), aed(4, 1, 1), aed(4, 0, 1), aed(4, 0, 1), aed(4, 1, 0)]
    assert r.expected_aed == pytest.approx(sum(a) / 6)
    assert r.expected_correct == pytest.approx(0.5)
    assert r.expected_incorrect == pytest.approx(1.0)


def test_rate_zero_is_the_untuned_model_and_rate_one_always_abstains() -> None:
    abstained, correct = [False] * 5, [True, False, True, False, False]
    zero = random_abstainer(abstained, correct, 0.0)
    assert zero.abstained == 0
    assert zero.expected_aed == pytest.approx(aed(5, 2, 3))
    one = random_abstainer(abstained, correct, 1.0)
    assert one.abstained == 5
    assert one.expected_aed == pytest.approx(1 / math.sqrt(2))
    assert one.to_dict()["engagement"] == 0.0


def test_k_rounds_half_up() -> None:
    assert random_abstainer([False] * 5, [True] * 5, 0.5).abstained == 3  # 2.5 -> 3
    assert random_abstainer([False] * 5, [True] * 5, 0.49).abstained == 2
    assert random_abstainer([False] * 3, [True] * 3, 0.5).abstained == 2  # 1.5 -> 2


def test_correct_flags_of_abstained_questions_are_ignored() -> None:
    a = random_abstainer([True, False, False], [True, True, False], 1 / 3)
    b = random_abstainer([True, False, False], [False, True, False], 1 / 3)
    assert a == b


@pytest.mark.parametrize("rate", [-0.1, 1.5, math.nan])
def test_rate_outside_unit_interval_is_refused(rate: float) -> None:
    with pytest.raises(ValueError):
        random_abstainer([False], [True], rate)


def test_no_questions_is_refused() -> None:
    with pytest.raises(ValueError):
        random_abstainer([], [], 0.5)


@settings(max_examples=60, deadline=None)
@given(
    flags=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=8),
    rate=st.floats(0.0, 1.0),
)
def test_matches_brute_force_over_every_subset(flags: list[tuple[bool, bool]], rate: float) -> None:
    abstained, correct = [f[0] for f in flags], [f[1] for f in flags]
    r = random_abstainer(abstained, correct, rate)
    c, i, a = _brute_force(abstained, correct, r.abstained)
    assert r.expected_correct == pytest.approx(c)
    assert r.expected_incorrect == pytest.approx(i)
    assert r.expected_aed == pytest.approx(a)


def test_large_set_is_finite_and_between_its_extremes() -> None:
    correct = [q % 3 == 0 for q in range(1500)]
    r = random_abstainer([False] * 1500, correct, 0.4)
    assert aed(1500, 500, 0) <= r.expected_aed <= 1 / math.sqrt(2)
    assert r.expected_aed == pytest.approx(r.aed_of_expected_counts, abs=1e-3)  # concentrated


# ---------------------------------------------------------------------------- Cohen's kappa


@pytest.mark.parametrize(
    ("a", "b", "kappa"),
    [
        ([1, 1, 0, 0], [1, 1, 0, 0], 1.0),
        ([1, 1, 0, 0], [0, 0, 1, 1], -1.0),
        # p_o = 3/4, p_a = 1/2, p_b = 1/4: p_e = 1/8 + 3/8 = 1/2 -> (3/4 - 1/2) / (1/2) = 1/2
        ([1, 1, 0, 0], [1, 0, 0, 0], 0.5),
        # p_o = 1/2, p_a = p_b = 1/2: p_e = 1/2 -> 0
        ([1, 0, 1, 0], [1, 1, 0, 0], 0.0),
        # 10 items: p_o = 0.7, p_a = 0.6, p_b = 0.5 -> p_e = 0.5 -> 0.4
        ([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 1, 0, 0, 0], 0.4),
        # one rater constant, the other not: kappa 0
        ([1, 1, 1, 1], [1, 0, 1, 0], 0.0),
        # both constant, opposite: p_e = 0, p_o = 0 -> 0
        ([1, 1, 1], [0, 0, 0], 0.0),
    ],
)
def test_kappa_hand_computed(a: list[int], b: list[int], kappa: float) -> None:
    assert cohens_kappa([bool(v) for v in a], [bool(v) for v in b]) == pytest.approx(kappa)
    assert cohens_kappa([bool(v) for v in b], [bool(v) for v in a]) == pytest.approx(kappa)  # symmetric


@pytest.mark.parametrize("value", [True, False])
def test_kappa_undefined_when_both_constant_and_equal(value: bool) -> None:
    assert math.isnan(cohens_kappa([value] * 3, [value] * 3))


def test_kappa_refuses_mismatched_or_empty() -> None:
    with pytest.raises(ValueError):
        cohens_kappa([True], [True, False])
    with pytest.raises(ValueError):
        cohens_kappa([], [])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=30))
def test_kappa_at_most_one(pairs: list[tuple[bool, bool]]) -> None:
    k = cohens_kappa([p[0] for p in pairs], [p[1] for p in pairs])
    assert math.isnan(k) or -1.0 - 1e-12 <= k <= 1.0 + 1e-12


# ---------------------------------------------------------------------------- in the run report


def _method(method: str, seeds: int = 1, **splits: dict) -> dict:
    return {"method": method, "label": method, "chosen_tau": None, "seeds": seeds, "splits": splits}


def _scores(n: int, correct: float, incorrect: float, abstained: float) -> dict:
    return {
        "num_questions": n,
        "correct_mean": correct,
        "incorrect_mean": incorrect,
        "abstained_mean": abstained,
        "aed_mean": aed(n, round(correct), round(incorrect)),
    }


def test_random_abstainer_row_follows_se_on_every_split_it_shares_with_untuned() -> None:
    from se_ray.run.results import RANDOM_AT_RATE, with_random_abstainer

    methods = [
        _method("untuned", test=_scores(4, 2, 2, 0), ood_elements=_scores(5, 3, 2, 0)),
        _method(
            "semantic_entropy",
            3,
            test=_scores(4, 1, 1, 2),
            ood_elements=_scores(5, 1, 0, 4.0),
            ood=_scores(2, 0, 0, 2),
        ),
        _method("r_tuning", test=_scores(4, 2, 0, 2)),
    ]
    out = with_random_abstainer(methods)
    assert [m["method"] for m in out] == ["untuned", "semantic_entropy", RANDOM_AT_RATE, "r_tuning"]
    row = out[2]
    assert row["seeds"] == 3 and set(row["splits"]) == {"test", "ood_elements"}  # no untuned "ood"
    test = row["splits"]["test"]
    assert test["abstained_mean"] == 2 and test["rate"] == 0.5
    assert test["aed_mean"] == pytest.approx(
        random_abstainer([False] * 4, [True, True, False, False], 0.5).expected_aed
    )
    assert test["correct_mean"] == pytest.approx(1.0)
    ood = row["splits"]["ood_elements"]
    assert ood["abstained_mean"] == 4 and ood["correct_mean"] == pytest.approx(3 * 1 / 5)


def test_random_abstainer_row_needs_untuned_and_se() -> None:
    from se_ray.run.results import with_random_abstainer

    only = [_method("untuned", test=_scores(4, 2, 2, 0)), _method("r_tuning", test=_scores(4, 2, 0, 2))]
    assert with_random_abstainer(only) == only


def _flags(abstained: list[bool]):
    from se_ray.evaluate import AnswerFlags

    n = len(abstained)
    return AnswerFlags(
        [f"q{i}" for i in range(n)], abstained, [None if a else True for a in abstained], [True] * n
    )


def test_agreement_with_the_teacher() -> None:
    from se_ray.run.results import agreement

    flags = {
        "untuned": _flags([False] * 4),
        "semantic_entropy": _flags([True, True, False, False]),
        "teacher": _flags([True, False, False, False]),
    }
    a = agreement(flags)
    assert set(a) == {"semantic_entropy"}
    se = a["semantic_entropy"]
    assert se["kappa"] == pytest.approx(0.5)
    assert (se["both_abstained"], se["only_method_abstained"], se["only_reference_abstained"]) == (1, 1, 0)
    assert se["neither_abstained"] == 2 and se["n"] == 4
    assert agreement({k: v for k, v in flags.items() if k != "teacher"}) == {}


def test_report_shows_random_row_ood_sets_and_band_abstention(tmp_path) -> None:
    from se_ray.report import render_report, report_splits, split_title
    from se_ray.run.results import with_random_abstainer

    methods = with_random_abstainer(
        [
            _method("untuned", test=_scores(4, 2, 2, 0), ood_elements=_scores(5, 3, 2, 0)),
            _method("semantic_entropy", test=_scores(4, 1, 1, 2), ood_elements=_scores(5, 1, 0, 4)),
        ]
    )
    assert report_splits(methods) == ["test", "ood_elements"]
    assert split_title("ood_elements") == "out-of-distribution set `elements`"
    bands = [
        {
            "band": "q1 (most popular)",
            "n": 2,
            "models": {
                "untuned": {"accuracy": 1.0, "abstention": 0.0},
                "semantic_entropy": {"accuracy": 0.5, "abstention": 0.5},
                "teacher": {"accuracy": 0.0, "abstention": 1.0},
            },
        }
    ]
    boundary = {
        "split": "test",
        "bands": bands,
        "retention": {},
        "agreement": {
            "semantic_entropy": {
                "reference": "teacher",
                "n": 4,
                "kappa": 0.5,
                "both_abstained": 1,
                "only_method_abstained": 1,
                "only_reference_abstained": 0,
                "neither_abstained": 2,
            }
        },
    }
    paths = render_report({"methods": methods, "knowledge_boundary": boundary}, str(tmp_path))
    text = Path(paths["report"]).read_text()
    assert "out-of-distribution set `elements`" in text
    assert text.count("| Random abstainer at the SE-tuned model's rate |") == 2  # test and the OOD set
    assert "computed exactly, not sampled" in text
    assert (
        "| q1 (most popular) | 2 | 100% | 50% | 100% |" in text
    )  # untuned correct, SE and teacher abstained
    assert "Cohen's κ = 0.50" in text


def test_named_ood_sets_are_splits_of_their_own() -> None:
    from se_ray.config import SplitConfig
    from se_ray.run.stages import Splits

    cfg = SplitConfig(ood_input="nq.jsonl", ood_inputs={"elements": "e.jsonl", "us_states": "s.jsonl"})
    assert cfg.ood_splits == {"ood": "nq.jsonl", "ood_elements": "e.jsonl", "ood_us_states": "s.jsonl"}
    assert SplitConfig().ood_splits == {}
    with pytest.raises(ValueError):
        SplitConfig(ood_inputs={"Elements!": "e.jsonl"})
    rows = {
        "train": [{}],
        "validation": [{}],
        "test": [{}],
        "ood": [],
        "ood_elements": [{}],
        "ood_us_states": [{}],
    }
    assert Splits(rows, "k").evaluated == ["test", "ood_elements", "ood_us_states"]


# ---------------------------------------------------------------------------- the study


def _study():
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("abstention_study", REPO / "bench" / "abstention_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_interval_is_clipped_to_the_unit_interval() -> None:
    study = _study()
    mean, low, high = study.interval([0.0, 0.0, 0.3])
    assert mean == pytest.approx(0.1) and low == 0.0 and 0.3 < high <= 1.0
    _, low, high = study.interval([0.95, 1.0, 1.0])
    assert high == 1.0 and low < 1.0
    _, low, _ = study.interval([0.0, 0.0, 0.3], bounded=False)  # gap closed may be negative
    assert low < 0.0


def test_study_never_worse_per_split_and_seed() -> None:
    study = _study()

    def seed(se: float, untuned: float) -> dict:
        return {"ood_elements": {"untuned": {"aed": untuned}, "semantic_entropy": {"aed": se}}}

    check = study.never_worse([seed(0.30, 0.32), seed(0.35, 0.33)], "ood_elements")["semantic_entropy"]
    assert check["every_seed"] is False and check["mean"] is True
    assert study.never_worse([seed(0.5, 0.3)], "ood_elements")["semantic_entropy"]["mean"] is False


def test_study_reads_every_split_of_a_run(tmp_path: Path) -> None:
    study = _study()

    def split(aed_: float, c: float, i: float, a: float) -> dict:
        return {
            "aed_mean": aed_,
            "aed_ci95": [aed_ - 0.05, aed_ + 0.05],
            "accuracy_mean": c / 10,
            "engagement_mean": (c + i) / 10,
            "correct_mean": c,
            "incorrect_mean": i,
            "abstained_mean": a,
        }

    data = {
        "methods": [
            {
                "method": "untuned",
                "splits": {"test": split(0.5, 5, 5, 0), "ood_elements": split(0.3, 7, 3, 0)},
            },
            {
                "method": "semantic_entropy",
                "splits": {"test": split(0.45, 4, 2, 4), "ood_elements": split(0.4, 4, 1, 5)},
            },
        ],
        "knowledge_boundary": {
            "retention": {"semantic_entropy": {"untuned_right": 5, "answered": 4, "still_right": 4}}
        },
    }
    (tmp_path / "report_data.json").write_text(json.dumps(data))
    scores = study.split_scores(tmp_path)
    assert list(scores) == ["test", "ood_elements"]
    assert scores["test"]["semantic_entropy"]["answered_untuned_right"] == pytest.approx(0.8)
    assert math.isnan(scores["ood_elements"]["semantic_entropy"]["answered_untuned_right"])  # test only
    assert scores["ood_elements"]["semantic_entropy"]["incorrect_avoided"] == pytest.approx(2 / 3)
    assert scores["ood_elements"]["semantic_entropy"]["aed_boot_high"] == pytest.approx(0.45)
    assert study.never_worse([scores], "ood_elements")["semantic_entropy"]["every_seed"] is False


def test_summary_keeps_the_random_abstainer_apart_from_the_methods() -> None:
    from se_ray.run.results import RANDOM_AT_RATE, run_summary, with_random_abstainer
    from se_ray.run.stages import StageLog
    from se_ray.storage import Store

    methods = with_random_abstainer(
        [_method("untuned", test=_scores(4, 2, 2, 0)), _method("semantic_entropy", test=_scores(4, 1, 1, 2))]
    )
    summary = run_summary(Store("/tmp/x"), {}, StageLog(), {"methods": methods}, 1.0)
    assert set(summary["methods"]) == {"untuned", "semantic_entropy"}
    assert summary[RANDOM_AT_RATE]["test"] == pytest.approx(methods[2]["splits"]["test"]["aed_mean"])
