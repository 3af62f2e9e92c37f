"""bench/risk_check.py re-splits a run's scored questions and checks the certified dial's guarantee,
on a synthetic run folder of real parquet files."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from se_ray import columns as col
from tests.conftest import REPO


def _risk_check():
    spec = importlib.util.spec_from_file_location("risk_check", REPO / "bench" / "risk_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(rng, n: int, informative: bool) -> pa.Table:
    """The model's own answer is wrong with probability 0.7·score (informative) or 0.4."""
    se = rng.random(n)
    wrong = rng.random(n) < (0.7 * se if informative else 0.4)
    abstains = rng.random(n) < 0.1
    own = [None if a else not w for a, w in zip(abstains, wrong, strict=True)]
    return pa.table(
        {
            col.ID: [f"q{i}" for i in range(n)],
            col.ABSTAINED: [bool(a) for a in abstains],
            col.CORRECT: own,
            col.SE_SCORE: se,
            col.ABSTAIN_LOGPROB: -rng.random(n),
            col.ANSWER_CORRECT: own,
        }
    )


def _run_folder(tmp_path, n_val=150, n_test=150):
    rng = np.random.default_rng(7)
    run = tmp_path / "run"
    for model, informative in (("untuned", True), ("trials/t0", False)):
        for split, n in (("validation", n_val), ("test", n_test)):
            folder = run / model / split
            folder.mkdir(parents=True)
            pq.write_table(_results(rng, n, informative), folder / "results.parquet")
    (run / "untuned" / "ood").mkdir()  # no validation beside it: ignored
    (run / "config.yaml").write_text("eval:\n  risk_alpha: 0.15\n  risk_delta: 0.1\n")
    return run


def test_finds_every_model_with_scored_validation_and_test(tmp_path):
    rc = _risk_check()
    models = rc.scored_models(_run_folder(tmp_path))
    assert sorted(models) == ["trials/t0", "untuned"]
    assert models["untuned"].num_rows == 300


def test_guarantee_holds_on_resplits(tmp_path, capsys):
    rc = _risk_check()
    code = rc.main(["--run", str(_run_folder(tmp_path)), "--splits", "300"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines[:-1]]
    assert len(rows) == 4  # 2 models x 2 scores
    assert {(r["model"], r["score"]) for r in rows} == {
        (m, s) for m in ("untuned", "trials/t0") for s in (col.SE_SCORE, col.ABSTAIN_LOGPROB)
    }
    for r in rows:
        assert r["alpha"] == 0.15 and r["delta"] == 0.1 and r["questions"] == 300
        # What the theorem bounds: the rule's risk on the pool both parts are drawn from.
        assert r["pool_exceed_share"] <= r["delta"] + 2 * r["pool_exceed_se"]
        assert r["ok"] == (r["exceed_share"] <= r["delta"] + 2 * r["exceed_se"])
    informative = next(r for r in rows if r["model"] == "untuned" and r["score"] == col.SE_SCORE)
    assert informative["certified_share"] > 0.9 and informative["test_engagement_mean"] > 0.2
    ok = sum(r["ok"] for r in rows)
    assert lines[-1].startswith(f"risk_check: {'OK' if ok == 4 else 'FAIL'}")
    assert f": {ok} of 4 model/score pairs" in lines[-1]
    assert code == (0 if ok == 4 else 1)


def test_the_test_split_guarantee_holds_on_the_test_parts(tmp_path, capsys):
    run = _run_folder(tmp_path)
    (run / "config.yaml").write_text(
        "eval:\n  risk_alpha: 0.15\n  risk_delta: 0.1\n  risk_guarantee: test_split\n"
    )
    code = _risk_check().main(["--run", str(run), "--splits", "300"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines[:-1]]
    assert {r["guarantee"] for r in rows} == {"test_split"}
    assert all(r["exceed_share"] <= r["delta"] + 2 * r["exceed_se"] for r in rows)
    assert lines[-1].startswith("risk_check: OK (guarantee test_split)") and code == 0
    # The flag overrides the run's setting.
    _risk_check().main(["--run", str(run), "--splits", "20", "--guarantee", "population"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[:-1]]
    assert {r["guarantee"] for r in rows} == {"population"}


def test_a_certifier_without_guarantee_is_caught(tmp_path, capsys, monkeypatch):
    # Swap the certifier for one that always answers everything: the uninformative model's
    # test risk (about 0.4 x 0.9) then exceeds α in nearly every split, and the check says FAIL.
    rc = _risk_check()

    def answer_everything(scores, wrong, alpha, delta, gives_answer=None, method="binomial", test_size=None):
        return rc.risk.Certification(alpha, delta, len(scores), method, float("inf"), 1.0, 0.0, 0.0)

    monkeypatch.setattr(rc.risk, "certify_threshold", answer_everything)
    code = rc.main(["--run", str(_run_folder(tmp_path)), "--splits", "50"])
    out = capsys.readouterr().out.strip().splitlines()
    rows = {(r["model"], r["score"]): r for r in map(json.loads, out[:-1])}
    assert rows[("trials/t0", col.SE_SCORE)]["exceed_share"] > 0.9
    assert not rows[("trials/t0", col.SE_SCORE)]["ok"]
    assert out[-1].startswith("risk_check: FAIL")
    assert code == 1


def test_check_score_rejects_an_impossible_split():
    rc = _risk_check()
    data = {"scores": [0.1], "wrong": [False], "gives_answer": [True]}
    with pytest.raises(ValueError):
        rc.check_score(data, 0.1, 0.1, 10, 0.5, 0)


def test_no_scored_results_fails_plainly(tmp_path, capsys):
    rc = _risk_check()
    (tmp_path / "empty").mkdir()
    assert rc.main(["--run", str(tmp_path / "empty")]) == 1
    assert "FAIL" in capsys.readouterr().out.splitlines()[-1]
