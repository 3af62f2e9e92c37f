"""Stage 6 and `se-ray run` end to end: the real CLI on the session's Ray cluster and vLLM engine.

* `se-ray evaluate` on 8 NQ questions with the base model, judged by SQuAD F1 and then by the
  LLM judge (the reference yes/no prompt through the same engine): results + metrics.json with
  consistent counts; a question without references is rejected.
* `se-ray run` at toy sizes (8 training questions, M=5, a two-value τ grid, SE + R-Tuning, one
  epoch) with 4 held-apart demo questions standing in for an OOD set: the τ sweep runs as a Ray
  Tune grid (Ray Train inside each trial), every trained model and the untuned one are evaluated
  on test and OOD, report.md and the PNGs are written; a rerun with the same config reuses every
  finished stage and does no model work.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from se_ray import metrics
from tests.conftest import ENGINE_OVERRIDES, REPO, run_cli

pytestmark = pytest.mark.slow

SMALL = ["sampling.max_tokens=16", "eval.judge=f1"]
REQUIRED = {
    "num_questions",
    "answered",
    "correct",
    "incorrect",
    "abstained",
    "accuracy",
    "engagement",
    "aed",
    "aed_ci95",
    "accuracy_ci95",
    "engagement_ci95",
    "judge",
}
DEMO = REPO / "se_ray" / "demo" / "nq_open_demo.jsonl"  # shipped: these tests never skip for data


def _sets(*overrides: str) -> list[str]:
    return [a for o in (*ENGINE_OVERRIDES, *SMALL, *overrides) for a in ("--set", o)]


def _summary(stdout: str) -> dict:
    """The CLI's JSON summary: the last top-level object on stdout (actors may print before it)."""
    start = stdout.rfind("\n{\n")
    return json.loads(stdout[start + 1 :] if start >= 0 else stdout)


def _check_evaluation(out: Path, n: int, judge: str) -> tuple[dict, list[dict]]:
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= REQUIRED, REQUIRED - set(m)
    assert m["num_questions"] == n and m["judge"] == judge
    assert m["answered"] == m["correct"] + m["incorrect"]
    assert m["correct"] + m["incorrect"] + m["abstained"] == n
    assert m["aed"] == pytest.approx(metrics.aed(n, m["correct"], m["incorrect"]))
    assert m["accuracy"] == pytest.approx(m["correct"] / n)
    assert m["engagement"] == pytest.approx(m["answered"] / n)
    assert m["aed_ci95"][0] <= m["aed"] <= m["aed_ci95"][1]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == n
    assert set(rows[0]) == {"id", "question", "references", "answer", "abstained", "correct", "judge"}
    assert sum(r["abstained"] for r in rows) == m["abstained"]
    assert sum(r["correct"] is True for r in rows) == m["correct"]
    for r in rows:
        assert (r["correct"] is None) == r["abstained"] and r["judge"] == judge and r["references"]
    return m, rows


def test_evaluate_base_model_f1_and_llm_judge(engine, tmp_path):
    lines = DEMO.read_text().splitlines()[:8]
    questions = tmp_path / "nq8.jsonl"
    questions.write_text(
        "\n".join(lines) + "\n" + json.dumps({"question": "a question without references"}) + "\n"
    )

    started = time.monotonic()
    out = tmp_path / "f1"
    res = run_cli("evaluate", "--input", str(questions), "--output", str(out), *_sets())
    assert res.returncode == 0, res.stderr[-3000:]
    f1_s = time.monotonic() - started
    summary = _summary(res.stdout)
    assert summary["num_questions"] == 8 and summary["rejected"] == 1 and summary["model_kind"] == "base"
    _, f1_rows = _check_evaluation(out, 8, "f1")
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and "references" in rejects[0]["reason"]

    started = time.monotonic()
    out = tmp_path / "llm"
    res = run_cli("evaluate", "--input", str(questions), "--output", str(out), *_sets("eval.judge=llm"))
    assert res.returncode == 0, res.stderr[-3000:]
    _, llm_rows = _check_evaluation(out, 8, "llm")
    # greedy decoding on the same engine: the same answers, judged another way
    assert [r["answer"] for r in llm_rows] == [r["answer"] for r in f1_rows]
    print(f"evaluate 8 questions: f1 {f1_s:.0f} s, llm {time.monotonic() - started:.0f} s")


RUN = [
    "sampling.num_samples=5",
    "split.train=8",
    "split.validation=4",
    "split.test=4",
    "split.ood_limit=4",
    "sweep.taus=[0.5, 1.5]",
    "sweep.methods=[semantic_entropy, r_tuning]",
    "sweep.seeds=1",
    "train.epochs=1",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.max_length=96",
    "train.learning_rate=1e-3",
    "train.export_merged=false",
]


def test_run_end_to_end_then_rerun_reuses_every_stage(engine, tmp_path):
    # The demo's last questions, held apart from the input, stand in for an OOD set.
    lines = DEMO.read_text().splitlines()
    questions, ood = tmp_path / "questions.jsonl", tmp_path / "ood.jsonl"
    questions.write_text("\n".join(lines[:-4]) + "\n")
    ood.write_text("\n".join(lines[-4:]) + "\n")
    out = tmp_path / "run"
    args = ["run", "--input", str(questions), "--output", str(out), *_sets(*RUN, f"split.ood_input={ood}")]
    started = time.monotonic()
    res = run_cli(*args, timeout=2400)
    assert res.returncode == 0, res.stderr[-5000:]
    first_s = time.monotonic() - started
    summary = _summary(res.stdout)
    stages = summary["stages"]
    assert stages["split"] == "ran" and stages["label"] == "ran" and stages["r_tuning_judge"] == "ran"
    plan = json.loads((out / "sweep" / "plan.json").read_text())
    assert [p["tau"] for p in plan["methods"]["semantic_entropy"]] == [0.5, 1.5]
    assert stages["sweep_trials"] == {"ran": len(plan["partitions"]), "reused": 0}
    assert stages["seed_trials"] == {"ran": 0, "reused": 0}
    # every trained model (one per distinct partition) and the untuned one on test and OOD,
    # the untuned model on validation too (the trials validated their own models)
    assert stages["evaluations_ran"] == 2 * len(plan["partitions"]) + 3

    assert set(summary["methods"]) == {"untuned", "semantic_entropy", "r_tuning"}
    assert summary["methods"]["semantic_entropy"]["chosen_tau"] in (0.5, 1.5)
    for m in summary["methods"].values():
        for split in ("test", "ood"):
            assert 0.0 <= m[f"{split}_aed_mean"] <= 1.0
            low, high = m[f"{split}_aed_ci95"]
            assert low <= high

    # Tune ran the sweep: its experiment folder holds one trial per distinct partition
    tune_dir = out / "tune" / "sweep"
    assert tune_dir.is_dir() and any(tune_dir.glob("experiment_state*.json"))
    trials = sorted((out / "trials").iterdir())
    assert len(trials) == len(plan["partitions"])
    for trial in trials:
        assert (trial / "train" / "adapter" / "adapter_config.json").exists()
        stage = json.loads((trial / "_stage.json").read_text())
        assert stage["done"] and stage["summary"]["validation"]["num_questions"] == 4
        for split in ("validation", "test", "ood"):
            _check_evaluation(trial / split, 4, "f1")
    for split, n in (("validation", 4), ("test", 4), ("ood", 4)):
        _check_evaluation(out / "untuned" / split, n, "f1")

    report = (out / "report.md").read_text()
    assert "AED on the in-distribution test split (4 questions" in report
    assert "AED on the out-of-distribution set (4 questions" in report
    for label in ("Untuned", "SE", "R-Tuning"):
        assert f"| {label} |" in report
    untuned_test = json.loads((out / "untuned" / "test" / "metrics.json").read_text())
    assert f"| Untuned | – | 1 | {untuned_test['aed']:.3f} |" in report
    assert "AED validation | AED test | AED OOD" in report
    assert report.count("-seed0 |") == len(plan["methods"]["semantic_entropy"]) + 1  # every τ, R-Tuning
    for png in ("adaptation.png", "aed_by_method.png", "se_histogram.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"]({png})" in report

    # The same command again: every stage is reused, no engine, no training, same numbers.
    report_mtime = (out / "report.md").stat().st_mtime
    started = time.monotonic()
    res = run_cli(*args, timeout=600)
    assert res.returncode == 0, res.stderr[-5000:]
    rerun_s = time.monotonic() - started
    again = _summary(res.stdout)
    assert again["stages"] == {
        "split": "reused",
        "label": "reused",
        "r_tuning_judge": "reused",
        "sweep_trials": {"ran": 0, "reused": len(plan["partitions"])},
        "seed_trials": {"ran": 0, "reused": 0},
        "evaluations_ran": 0,
    }
    assert again["methods"] == summary["methods"]
    assert "starting vLLM engine" not in res.stderr and "Tuner" not in res.stderr
    assert (out / "report.md").stat().st_mtime > report_mtime
    assert rerun_s < 120, rerun_s
    print(f"se-ray run: first {first_s:.0f} s, rerun {rerun_s:.0f} s")
