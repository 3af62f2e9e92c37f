"""The run report rendered from a hand-made results dict (Markdown tables and non-empty PNGs), and
the report data and summary `se-ray run` assembles from its outcome."""

from __future__ import annotations

import json
import math

from se_ray.config import load_config
from se_ray.report import METHOD_LABELS, render_report
from se_ray.run.plan import SweepPoint
from se_ray.run.results import RunOutcome, publish_report, report_data, run_summary
from se_ray.run.stages import StageLog, TrialCounts
from se_ray.storage import Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _split(aed_mean, aed_sd, ci, acc, eng, c, i, a, n=32):
    return {
        "num_questions": n,
        "aed_mean": aed_mean,
        "aed_sd": aed_sd,
        "aed_ci95": ci,
        "accuracy_mean": acc,
        "accuracy_sd": None if aed_sd is None else 0.01,
        "engagement_mean": eng,
        "engagement_sd": None if aed_sd is None else 0.02,
        "correct_mean": c,
        "incorrect_mean": i,
        "abstained_mean": a,
    }


def _point(aed, c, i, a, n):
    return {"aed": aed, "correct": c, "incorrect": i, "abstained": a, "num_questions": n}


def _data():
    return {
        "title": "hand-made run",
        "setup": {"model": "builtin:smollm2-135m-instruct", "judge": "f1 (max SQuAD F1 ≥ 0.5)", "seeds": 3},
        "methods": [
            {
                "method": "untuned",
                "label": "Untuned",
                "chosen_tau": None,
                "seeds": 1,
                "splits": {
                    "test": _split(0.7123, None, [0.65, 0.77], 0.0625, 1.0, 2, 30, 0),
                    "ood": _split(1.0, None, [1.0, 1.0], 0.0, 1.0, 0, 32, 0),
                },
            },
            {
                "method": "semantic_entropy",
                "label": "SE",
                "chosen_tau": 0.75,
                "seeds": 3,
                "splits": {
                    "test": _split(0.6543, 0.0123, [0.61, 0.70], 0.0938, 0.5, 3.0, 13.0, 16.0),
                    "ood": _split(0.6789, 0.0211, [0.64, 0.71], 0.0312, 0.25, 1.0, 7.0, 24.0),
                },
            },
            {
                "method": "exact_entropy",
                "label": "R-Tuning-U",
                "chosen_tau": 2.25,
                "seeds": 3,
                "splits": {"test": _split(0.6901, 0.0050, [0.66, 0.72], 0.0625, 0.9, 2.0, 26.8, 3.2)},
            },
            {
                "method": "r_tuning",
                "label": "R-Tuning",
                "chosen_tau": None,
                "seeds": 3,
                "splits": {"test": _split(0.7010, 0.0300, [math.nan, math.nan], 0.03, 0.1, 1.0, 2.0, 29.0)},
            },
        ],
        "sweep": {
            "semantic_entropy": [
                {
                    "tau": 0.5,
                    "trial": "pabc-seed0",
                    "validation": _point(0.6912, 1, 5, 10, 16),
                    "test": _point(0.6501, 3, 9, 20, 32),
                    "ood": _point(0.7105, 1, 3, 28, 32),
                },
                {
                    "tau": 0.75,
                    "trial": "pdef-seed0",
                    "validation": _point(0.6321, 2, 4, 10, 16),
                    "test": _point(0.6543, 3, 13, 16, 32),
                    "ood": _point(0.6789, 1, 7, 24, 32),
                },
            ],
            "r_tuning": [
                {
                    "tau": None,
                    "trial": "pghi-seed0",
                    "validation": _point(0.7083, 0, 1, 15, 16),
                    "test": _point(0.7010, 1, 2, 29, 32),
                }
            ],
            "untuned": [
                {
                    "tau": None,
                    "trial": "untuned",
                    "validation": _point(0.9017, 1, 15, 0, 16),
                    "test": _point(0.7123, 2, 30, 0, 32),
                    "ood": _point(0.7071, 0, 32, 0, 32),
                }
            ],
        },
        "adaptation_split": "ood",
        "train_scores": {"semantic_entropy": [0.0, 0.325, 0.5, 0.693, 1.609, 2.303, 2.303, 0.0]},
        "taus": [0.5, 0.75],
        "chosen_tau": {"semantic_entropy": 0.75, "exact_entropy": 2.25},
        "notes": ["SE: τ = 0.75 and 1.0 give the same training set (one trained model)."],
    }


def test_report_renders_tables_and_figures(tmp_path):
    paths = render_report(_data(), str(tmp_path))
    assert set(paths) == {"report", "adaptation", "aed", "histogram"}
    for key in ("adaptation", "aed", "histogram"):
        with open(paths[key], "rb") as f:
            data = f.read()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, key
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# hand-made run")
    # the ID and OOD tables with mean ± s.d., intervals, accuracy and engagement
    assert "AED on the in-distribution test split (32 questions" in md
    assert "AED on the out-of-distribution set (32 questions" in md
    assert (
        "| SE | 0.75 | 3 | 0.654 ± 0.012 | [0.610, 0.700] | 0.094 ± 0.010 | 0.500 ± 0.020 "
        "| 3.0 | 13.0 | 16.0 |" in md
    )
    assert "| Untuned | – | 1 | 0.712 | [0.650, 0.770] | 0.062 | 1.000 | 2 | 30 | 0 |" in md
    assert "| R-Tuning-U | 2.25 | 3 | 0.690 ± 0.005 |" in md
    assert "| R-Tuning | – | 3 | 0.701 ± 0.030 | – |" in md  # a NaN interval renders as a dash
    # chosen τ, the sweep table, the figures and the notes
    assert "SE τ = 0.75" in md and "R-Tuning-U τ = 2.25" in md
    assert (
        "| method | τ | AED validation | AED test | AED OOD | correct | incorrect | abstained | trial |" in md
    )
    assert "| SE | 0.5 | 0.691 | 0.650 | 0.711 | 1 | 3 | 28 | pabc-seed0 |" in md  # counts: OOD
    assert "| R-Tuning | – | 0.708 | 0.701 | – | – | – | – | pghi-seed0 |" in md
    assert "| Untuned | – | 0.902 | 0.712 | 0.707 | 0 | 32 | 0 | untuned |" in md
    for png in ("adaptation.png", "aed_by_method.png", "se_histogram.png"):
        assert f"]({png})" in md
    assert "give the same training set" in md


def test_report_without_sweep_or_ood(tmp_path):
    data = _data()
    data["sweep"] = {}
    data["train_scores"] = {}
    for m in data["methods"]:
        m["splits"].pop("ood", None)
    paths = render_report(data, str(tmp_path))
    assert set(paths) == {"report", "aed"}
    md = (tmp_path / "report.md").read_text()
    assert "out-of-distribution" not in md and "adaptation.png" not in md


def _outcome() -> RunOutcome:
    data = _data()
    sweep = {
        method: [
            SweepPoint(
                p["tau"],
                p["trial"],
                None if method == "untuned" else f"d-{p['trial']}",
                {k: v for k, v in p.items() if k in ("validation", "test", "ood")},
            )
            for p in points
        ]
        for method, points in data["sweep"].items()
    }
    return RunOutcome(
        split_sizes={"train": 48, "validation": 16, "test": 32, "ood": 32},
        methods=data["methods"],
        sweep=sweep,
        adaptation_split="ood",
        train_entropies=data["train_scores"]["semantic_entropy"],
        notes=list(data["notes"]),
    )


def test_report_data_from_a_run_outcome_renders(tmp_path):
    cfg = load_config(None, ["sweep.taus=[0.5, 0.75]", "eval.judge=f1"])
    data = report_data(cfg, _outcome())
    assert json.loads(json.dumps(data))["sweep"] == data["sweep"]  # report_data.json holds it as is
    assert data["setup"]["split (train / validation / test / OOD)"] == "48 / 16 / 32 / 32"
    assert data["setup"]["judge"] == "f1 (max SQuAD F1 ≥ 0.5)"
    assert data["chosen_tau"] == {"semantic_entropy": 0.75, "exact_entropy": 2.25}
    assert data["taus"] == [0.5, 0.75]
    se = data["sweep"]["semantic_entropy"][0]
    assert se["digest"] == "d-pabc-seed0" and se["ood"]["correct"] == 1
    assert "digest" not in data["sweep"]["untuned"][0]
    assert [m["label"] for m in data["methods"]] == [METHOD_LABELS[m["method"]] for m in data["methods"]]
    paths = publish_report(data, Store(str(tmp_path)))
    assert set(paths) == {"report", "adaptation", "aed", "histogram"}
    md = (tmp_path / "report.md").read_text()
    assert "| SE | 0.5 | 0.691 | 0.650 | 0.711 | 1 | 3 | 28 | pabc-seed0 |" in md


def test_run_summary_names_the_report_and_each_methods_aed(tmp_path):
    out = Store(str(tmp_path))
    log = StageLog(split="ran", label="ran", sweep_trials=TrialCounts(3, 0), seed_trials=TrialCounts(0, 0))
    paths = {"report": str(tmp_path / "report.md"), "aed": str(tmp_path / "aed_by_method.png")}
    summary = run_summary(out, paths, log, {"methods": _data()["methods"]}, 12.345)
    assert summary["output"] == str(tmp_path) and summary["report"] == paths["report"]
    assert summary["figures"] == {"aed": paths["aed"]} and summary["wall_s"] == 12.35
    assert summary["stages"]["sweep_trials"] == {"ran": 3, "reused": 0}
    se = summary["methods"]["semantic_entropy"]
    assert se["chosen_tau"] == 0.75 and se["seeds"] == 3
    assert se["test_aed_mean"] == 0.6543 and se["ood_aed_ci95"] == [0.64, 0.71]
    assert set(summary["methods"]["exact_entropy"]) == {
        "chosen_tau",
        "seeds",
        "test_aed_mean",
        "test_aed_sd",
        "test_aed_ci95",
    }
    assert summary["oracle"] == {} and summary["score_diagnostics"] is None


def _band(name: str, untuned: tuple[int, int], se: tuple[int, int], n: int = 4) -> dict:
    """A band of ``n`` questions; per model (correct, abstained)."""
    return {
        "band": name,
        "n": n,
        "models": {
            m: {"n": n, "correct": c, "abstained": a, "accuracy": c / n, "abstention": a / n}
            for m, (c, a) in (("untuned", untuned), ("semantic_entropy", se))
        },
    }


BANDS = [_band("q1 (most popular)", (3, 0), (3, 1)), _band("q5 (least popular)", (1, 0), (0, 3))]
AUDIT = {
    "answered": 30,
    "correct": {"contains": 12, "f1": 3, "exact": 10},
    "disagreements": 9,
    "examples": [
        {
            "question": "What is the capital of France?",
            "answer": "The capital of France is Paris.",
            "references": ["Paris"],
            "contains": True,
            "f1": False,
            "exact": True,
        },
        {
            "question": "Is a | b a question?",
            "answer": "Yes,\nit is.",
            "references": ["yes", "indeed"],
            "contains": True,
            "f1": True,
            "exact": False,
        },
    ],
}
DIAGNOSTICS = {
    "judge": "contains",
    "judged": 40,
    "standard_wrong": 30,
    "semantic_entropy": {"auroc": 0.7123, "aurac": 0.3456},
    "regular_semantic_entropy": {"auroc": 0.65, "aurac": 0.3},
    "exact_entropy": {"auroc": math.nan, "aurac": 0.2},
}


def _full_data():
    """``_data()`` with what a run now adds: the oracle, the gap closed, abstention on unanswerable
    questions, the knowledge boundary, the judge audit and the labeller diagnostics."""
    data = _data()
    data["oracle"] = {
        "test": {
            "aed": 0.6629,
            "accuracy": 0.0625,
            "engagement": 0.0625,
            "correct": 2,
            "incorrect": 0,
            "abstained": 30,
            "num_questions": 32,
        }
    }
    extras = {
        "untuned": (0.0, 8, 0.0),
        "semantic_entropy": (0.4, 8, 16 / 3),
        "exact_entropy": (0.25, 8, 2.0),
        "r_tuning": (None, 0, None),
    }
    for m in data["methods"]:
        gap, total, abstained = extras[m["method"]]
        m["splits"]["test"] |= {
            "gap_closed": gap,
            "unanswerable": total,
            "unanswerable_abstained_mean": abstained,
        }
    data["knowledge_boundary"] = {
        "split": "test",
        "bands": BANDS,
        "retention": {"semantic_entropy": {"untuned_right": 8, "answered": 5, "still_right": 4}},
    }
    data["judge_audit"] = AUDIT
    data["score_diagnostics"] = DIAGNOSTICS
    return data


def test_report_shows_the_oracle_the_gap_and_unanswerable_questions(tmp_path):
    render_report(_full_data(), str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "| abstained | gap closed | abstained on unanswerable |" in md
    assert "| Untuned | – | 1 | 0.712 | [0.650, 0.770] | 0.062 | 1.000 | 2 | 30 | 0 | 0% | 0 of 8 |" in md
    assert (
        "| SE | 0.75 | 3 | 0.654 ± 0.012 | [0.610, 0.700] | 0.094 ± 0.010 | 0.500 ± 0.020 "
        "| 3.0 | 13.0 | 16.0 | 40% | 5.3 of 8 |" in md
    )
    assert "| R-Tuning-U | 2.25 | 3 | 0.690 ± 0.005 |" in md and "| 25% | 2 of 8 |" in md
    assert "| 2.0 | 29.0 | n/a | – |" in md  # R-Tuning: no gap known, no unanswerable questions
    assert (
        "| Oracle (abstains where untuned is wrong) | – | – | 0.663 | – | 0.062 | 0.062 | 2 | 0 | 30 "
        "| 100% | – |" in md
    )
    assert "(1 − untuned accuracy)/√2" in md
    assert "of the 8 questions about things that do not exist, how many the model abstained on" in md
    # the OOD table: no oracle, no unanswerable questions, no extra columns
    ood = md.split("AED on the out-of-distribution set")[1].split("\n\n")[1]
    assert ood.splitlines()[0].endswith("| correct | incorrect | abstained |") and "Oracle" not in ood


def test_report_shows_the_knowledge_boundary(tmp_path):
    paths = render_report(_full_data(), str(tmp_path))
    assert set(paths) == {"report", "adaptation", "aed", "histogram", "knowledge_boundary"}
    with open(paths["knowledge_boundary"], "rb") as f:
        png = f.read()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    md = (tmp_path / "report.md").read_text()
    assert "Accuracy and abstention by popularity band (in-distribution test split" in md
    assert "| band | n | Untuned correct | Untuned abstained | SE correct | SE abstained |" in md
    assert "| q1 (most popular) | 4 | 75% (3) | 0% (0) | 75% (3) | 25% (1) |" in md
    assert "| q5 (least popular) | 4 | 25% (1) | 0% (0) | 0% (0) | 75% (3) |" in md
    assert "](knowledge_boundary.png)" in md
    assert "| method | untuned right | still answered | still right |" in md
    assert "| SE | 8 | 62% (5) | 50% (4) |" in md


def test_report_shows_the_judge_audit_and_the_labeller_diagnostics(tmp_path):
    render_report(_full_data(), str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "## Judge audit (untuned model, in-distribution test split)" in md
    assert "Of the 30 answers the untuned model gave" in md
    assert "| contains (a reference occurs as whole tokens) | 12 | 40% |" in md
    assert "| f1 (max SQuAD F1 ≥ threshold) | 3 | 10% |" in md
    assert "They disagree on 9 answers." in md
    assert "| question | answer | references | contains | f1 | exact |" in md
    assert (
        "| What is the capital of France? | The capital of France is Paris. | Paris | yes | no | yes |" in md
    )
    assert "| Is a \\| b a question? | Yes, it is. | yes; indeed | yes | yes | no |" in md
    assert "## Does the entropy predict wrong answers?" in md
    assert "on the 40 training questions with references, the `contains` judge" in md
    assert "wrong on 30 (75%)" in md
    assert "| discrete semantic entropy (SE's labels) | 0.712 | 0.346 |" in md
    assert "| regular semantic entropy (token probabilities) | 0.650 | 0.300 |" in md
    assert "| exact-string entropy (R-Tuning-U's labels) | – | 0.200 |" in md  # NaN AUROC: one class


def test_report_leaves_out_the_new_sections_without_their_data(tmp_path):
    render_report(_data(), str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    for absent in (
        "Oracle",
        "gap closed",
        "unanswerable",
        "popularity band",
        "Judge audit",
        "entropy predict",
    ):
        assert absent not in md
