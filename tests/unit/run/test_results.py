"""The report's pure computations, hand-checked: the oracle abstainer and the share of the gap each
method closes, abstention on unanswerable questions over seeds, accuracy and abstention per band;
and what the report data and ``summary.json`` carry of them."""

from __future__ import annotations

import math

import pytest

from se_ray.config import load_config
from se_ray.evaluate import AnswerFlags
from se_ray.run.results import (
    band_table,
    gap_closed,
    oracle_scores,
    publish_report,
    report_data,
    retention,
    run_summary,
    unanswerable_scores,
    with_oracle,
)
from se_ray.run.stages import StageLog
from se_ray.storage import Store
from tests.unit.test_report import AUDIT, BANDS, DIAGNOSTICS, _full_data, _outcome


def test_gap_closed_is_the_share_of_the_untuned_to_oracle_distance():
    assert gap_closed(0.5, 0.4, 0.3) == pytest.approx(0.5)
    assert gap_closed(0.5, 0.3, 0.3) == pytest.approx(1.0)
    assert gap_closed(0.5, 0.5, 0.3) == 0.0
    assert gap_closed(0.5, 0.6, 0.3) == pytest.approx(-0.5)  # worse than the untuned model
    assert gap_closed(0.3, 0.2, 0.3) is None  # the untuned model makes no mistake: no gap


def test_oracle_answers_what_the_untuned_model_gets_right():
    # 6 of 10 right: AED = (1 - 0.6)/sqrt(2)
    oracle = oracle_scores({"num_questions": 10, "correct_mean": 6.0, "aed_mean": 0.4})
    assert oracle["aed"] == pytest.approx(0.4 / math.sqrt(2))
    assert oracle["accuracy"] == oracle["engagement"] == 0.6
    assert (oracle["correct"], oracle["incorrect"], oracle["abstained"], oracle["num_questions"]) == (
        6,
        0,
        4,
        10,
    )


def _method(name, aed, correct=6.0, n=10):
    return {
        "method": name,
        "label": name,
        "chosen_tau": None,
        "seeds": 1,
        "splits": {"test": {"num_questions": n, "aed_mean": aed, "correct_mean": correct}},
    }


def test_with_oracle_adds_the_gap_to_every_method():
    # untuned: 6 right, 4 wrong of 10 -> AED sqrt((16 + 16)/200) = 0.4; oracle 0.4/sqrt(2) = 0.28284
    methods, oracle = with_oracle([_method("untuned", 0.4), _method("semantic_entropy", 0.3, correct=5.0)])
    assert oracle["test"]["aed"] == pytest.approx(0.2828427)
    gaps = [m["splits"]["test"]["gap_closed"] for m in methods]
    assert gaps[0] == 0.0
    assert gaps[1] == pytest.approx(0.1 / 0.1171573)  # 0.8536
    assert methods[1]["splits"]["test"]["correct_mean"] == 5.0


def test_with_oracle_without_the_untuned_model_adds_nothing():
    methods, oracle = with_oracle([_method("semantic_entropy", 0.3)])
    assert oracle == {} and "gap_closed" not in methods[0]["splits"]["test"]


def test_unanswerable_scores_mean_over_seeds():
    summaries = [
        {"unanswerable": 4, "unanswerable_abstained": 1},
        {"unanswerable": 4, "unanswerable_abstained": 2},
    ]
    assert unanswerable_scores(summaries) == {"unanswerable": 4, "unanswerable_abstained_mean": 1.5}
    assert unanswerable_scores([{"num_questions": 3}]) == {
        "unanswerable": 0,
        "unanswerable_abstained_mean": None,
    }


ROWS = [
    {"id": "a", "band": "q1 (most popular)"},
    {"id": "b", "band": "q1 (most popular)"},
    {"id": "c", "band": "q2"},
    {"id": "d", "band": "unanswerable", "answerable": False},
    {"id": "e"},  # no band: left out
]


def test_band_table_counts_each_models_answers_per_band():
    ids = ["a", "b", "c", "d", "e"]
    untuned = AnswerFlags(
        ids, [False] * 5, [True, False, False, False, True], [True, True, True, False, True]
    )
    se = AnswerFlags(
        ids, [False, True, True, True, False], [True, None, None, None, True], [True] * 3 + [False, True]
    )
    table = band_table(ROWS, {"untuned": untuned, "semantic_entropy": se})
    assert [(b["band"], b["n"]) for b in table] == [("q1 (most popular)", 2), ("q2", 1)]
    q1, q2 = table[0]["models"], table[1]["models"]
    assert q1["untuned"] == {"n": 2, "correct": 1, "abstained": 0, "accuracy": 0.5, "abstention": 0.0}
    assert q1["semantic_entropy"] == {
        "n": 2,
        "correct": 1,
        "abstained": 1,
        "accuracy": 0.5,
        "abstention": 0.5,
    }
    assert q2["untuned"] == {"n": 1, "correct": 0, "abstained": 0, "accuracy": 0.0, "abstention": 0.0}
    assert q2["semantic_entropy"] == {
        "n": 1,
        "correct": 0,
        "abstained": 1,
        "accuracy": 0.0,
        "abstention": 1.0,
    }


def test_band_table_natural_order_missing_flags_and_no_bands():
    rows = [{"id": str(k), "band": b} for k, b in enumerate(["q10", "q2", "q1 (most popular)"])]
    flags = AnswerFlags(["0", "2"], [False, False], [True, False], [True, True])  # "1" rejected by the engine
    table = band_table(rows, {"untuned": flags})
    assert [b["band"] for b in table] == ["q1 (most popular)", "q2", "q10"]
    assert table[1]["n"] == 1 and table[1]["models"]["untuned"]["n"] == 0
    assert table[1]["models"]["untuned"]["accuracy"] is None
    assert table[2]["models"]["untuned"]["accuracy"] == 1.0
    assert band_table([{"id": "a"}, {"id": "b", "band": ""}], {"untuned": flags}) == []


def test_retention_follows_the_untuned_models_right_answers_question_by_question():
    ids = ["a", "b", "c", "d", "e"]
    untuned = AnswerFlags(ids, [False] * 5, [True, False, False, False, True], [True] * 5)
    # answers a (now wrong) and b (now right, but the untuned model was wrong there), abstains on e
    se = AnswerFlags(ids, [False, False, True, True, True], [False, True, None, None, None], [True] * 5)
    # one question fewer (rejected by the engine): e is still counted as not answered
    other = AnswerFlags(["a", "b"], [False, False], [True, True], [True, True])
    kept = retention({"untuned": untuned, "semantic_entropy": se, "r_tuning": other})
    assert kept == {
        "semantic_entropy": {"untuned_right": 2, "answered": 1, "still_right": 0},
        "r_tuning": {"untuned_right": 2, "answered": 1, "still_right": 1},
    }
    assert retention({"semantic_entropy": se}) == {}


def test_report_data_and_summary_carry_the_oracle_bands_audit_and_diagnostics(tmp_path):
    cfg = load_config(None, ["sweep.taus=[0.5, 0.75]", "eval.judge=f1"])
    outcome = _outcome()
    outcome.bands, outcome.judge_audit, outcome.score_diagnostics = BANDS, AUDIT, DIAGNOSTICS
    data = report_data(cfg, outcome)
    # the untuned model gets 2 of 32 right on test: the oracle's AED is (30/32)/sqrt(2)
    oracle = 0.9375 / math.sqrt(2)
    assert data["oracle"]["test"]["aed"] == pytest.approx(oracle)
    assert data["oracle"]["ood"]["aed"] == pytest.approx(1 / math.sqrt(2))
    se = next(m for m in data["methods"] if m["method"] == "semantic_entropy")
    assert se["splits"]["test"]["gap_closed"] == pytest.approx((0.7123 - 0.6543) / (0.7123 - oracle))
    assert data["knowledge_boundary"] == {"split": "test", "bands": BANDS, "retention": {}}
    assert data["judge_audit"] == AUDIT and data["score_diagnostics"] == DIAGNOSTICS
    paths = publish_report(data, Store(str(tmp_path)))
    assert "knowledge_boundary" in paths
    summary = run_summary(Store(str(tmp_path)), paths, StageLog(), data, 1.0)
    assert summary["oracle"]["test"] == pytest.approx(oracle)
    assert summary["methods"]["semantic_entropy"]["test_gap_closed"] == pytest.approx(1.1744, abs=1e-4)
    assert summary["methods"]["untuned"]["ood_gap_closed"] == 0.0
    assert summary["score_diagnostics"] == DIAGNOSTICS
    assert summary["figures"]["knowledge_boundary"].endswith("knowledge_boundary.png")


def test_summary_carries_abstention_on_unanswerable_questions(tmp_path):
    summary = run_summary(Store(str(tmp_path)), {}, StageLog(), _full_data(), 1.0)
    se = summary["methods"]["semantic_entropy"]
    assert se["test_unanswerable"] == 8 and se["test_unanswerable_abstained_mean"] == pytest.approx(16 / 3)
    assert se["test_gap_closed"] == 0.4 and "ood_gap_closed" not in se
    assert summary["methods"]["r_tuning"]["test_unanswerable_abstained_mean"] is None


def test_the_report_says_which_step_was_exported_and_why():
    from se_ray.config import load_config
    from se_ray.run.results import _setup
    from se_ray.run.trials import selection_note

    train = {
        "steps": 60,
        "selected_step": 25,
        "selection": {"questions": 40, "selected_rate": 0.45, "target_rate": 0.4625, "probes": [[5, 0.0]]},
    }
    assert selection_note("SE", train) == (
        "SE: the exported model is step 25 of 60, whose greedy answers abstained on 45% of 40 "
        "validation questions (training labels: 46% abstain)."
    )
    assert selection_note("SE", {"steps": 60, "selected_step": 60, "selection": None}) is None
    sizes = {"train": 1, "validation": 1, "test": 1, "ood": 0}
    assert "exported" not in _setup(load_config(None, []), sizes)["training"]
    cfg = load_config(None, ["train.select_checkpoint=label_rate", "train.select_every_steps=5"])
    assert _setup(cfg, sizes)["training"].endswith(
        "; exported: the step (every 5 steps and each epoch's end) whose validation abstention rate "
        "is closest to the training labels'"
    )
