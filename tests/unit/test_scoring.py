"""Abstention scores, the teacher and the certified dial on results tables (se_ray.scoring), with a
scripted engine pool (the engine is not under test; the scoring and its use of the labeling
stage's clustering and entropy functions are)."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from se_ray import columns as col
from se_ray import entropy, risk, scoring
from se_ray.config import ABSTENTION_TEXT, JobConfig
from se_ray.engine import Completion, Rejected
from se_ray.evaluate import RESULTS_FILE, evaluate_rows
from se_ray.judges.correctness import F1Judge
from se_ray.judges.entailment import ENTAILMENT, NEUTRAL
from se_ray.storage import Store


class SameTextJudge:
    """Two answers are equivalent iff their first words match, lower-cased."""

    def __init__(self):
        self.model_calls = 0

    def implications(self, queries):
        self.model_calls += len(queries)
        return [
            ENTAILMENT if q.premise.split()[0].lower() == q.hypothesis.split()[0].lower() else NEUTRAL
            for q in queries
        ]

    def reset_cache(self):
        pass


class ScriptedPool:
    """Replies by question text: greedy answer (n = 1), M samples (n > 1), abstention log-prob."""

    def __init__(self, greedy, samples, logprobs, reject=()):
        self.greedy, self.samples, self.logprobs, self.reject = greedy, samples, logprobs, set(reject)
        self.calls = []

    def _find(self, table, conversation):
        text = conversation[-1]["content"]
        return next(v for k, v in table.items() if k in text)

    def _rejected(self, conversation):
        return any(k in conversation[-1]["content"] for k in self.reject)

    def chat(self, conversations, params, adapter=None, batch_size=None):
        self.calls.append(("chat", params["n"], adapter))
        out = []
        for c in conversations:
            if self._rejected(c):
                out.append(Rejected("too long"))
            elif params["n"] == 1:
                out.append([Completion(self._find(self.greedy, c), -1.0, 2)])
            else:
                out.append(
                    [Completion(t, -float(i + 1), 1) for i, t in enumerate(self._find(self.samples, c))]
                )
        return out

    def continuation_logprobs(self, conversations, continuation, adapter=None):
        self.calls.append(("continuation", continuation, adapter))
        return [Rejected("x") if self._rejected(c) else self._find(self.logprobs, c) for c in conversations]


ROWS = [
    {col.ID: "a", col.QUESTION: "Capital of France?", col.REFERENCES: ["Paris"], col.CONTEXT: None},
    {col.ID: "b", col.QUESTION: "Capital of Peru?", col.REFERENCES: ["Lima"], col.CONTEXT: None},
    {col.ID: "c", col.QUESTION: "Capital of Chad?", col.REFERENCES: ["N'Djamena"], col.CONTEXT: None},
]
GREEDY = {"France": "Paris", "Peru": "Cusco", "Chad": "Abuja"}
SAMPLES = {
    "France": ["Paris", "paris city", "Paris", "Lyon"],  # clusters [0, 0, 0, 1]
    "Peru": ["Lima", "Cusco", "Quito", "Lima"],  # [0, 1, 2, 0]
    "Chad": ["x", "y", "z", "w"],
}
LOGPROBS = {"France": -9.0, "Peru": -2.0, "Chad": -0.5}


def _cfg(*scores: str, method: str = "semantic_entropy") -> JobConfig:
    cfg = JobConfig()
    return cfg.model_copy(
        update={
            "eval": cfg.eval.model_copy(update={"scores": list(scores), "bootstrap_samples": 20}),
            "sampling": cfg.sampling.model_copy(update={"num_samples": 4}),
            "labeling": cfg.labeling.model_copy(update={"method": method}),
        }
    )


def test_se_scores_cluster_with_the_judge_and_use_the_entropy_math():
    pool = ScriptedPool(GREEDY, SAMPLES, LOGPROBS, reject=["Chad"])
    scorer = scoring.Scorer(_cfg("se_score"), judge=SameTextJudge())
    out = scorer.score(ROWS, pool, adapter="/adapters/x")
    se = out[col.SE_SCORE]
    assert se[0] == pytest.approx(entropy.discrete_semantic_entropy([0, 0, 0, 1]))
    assert se[1] == pytest.approx(entropy.discrete_semantic_entropy([0, 1, 2, 0]))
    assert math.isnan(se[2])  # rejected by the engine: no score
    assert pool.calls == [("chat", 4, "/adapters/x")]
    assert col.ABSTAIN_LOGPROB not in out


def test_regular_se_when_labeling_uses_it():
    pool = ScriptedPool(GREEDY, SAMPLES, LOGPROBS)
    scorer = scoring.Scorer(_cfg("se_score", method="regular_semantic_entropy"), judge=SameTextJudge())
    se = scorer.score(ROWS[:1], pool)[col.SE_SCORE]
    assert se[0] == pytest.approx(entropy.regular_semantic_entropy([0, 0, 0, 1], [-1.0, -2.0, -3.0, -4.0]))


def test_abstain_logprob_uses_the_abstention_text_and_adapter():
    pool = ScriptedPool(GREEDY, SAMPLES, LOGPROBS, reject=["Peru"])
    out = scoring.Scorer(_cfg("abstain_logprob")).score(ROWS, pool, adapter="/a")
    assert out[col.ABSTAIN_LOGPROB][0] == -9.0 and out[col.ABSTAIN_LOGPROB][2] == -0.5
    assert math.isnan(out[col.ABSTAIN_LOGPROB][1])
    assert pool.calls == [("continuation", ABSTENTION_TEXT, "/a")]


def test_no_scores_configured_computes_nothing():
    pool = ScriptedPool(GREEDY, SAMPLES, LOGPROBS)
    assert scoring.Scorer(_cfg()).score(ROWS, pool) == {}
    assert pool.calls == []


def test_teacher_flags():
    abstained, correct = scoring.teacher_flags(
        [False, False, True, False], [True, False, None, True], [0.1, 2.0, 0.0, float("nan")], 1.0
    )
    assert abstained == [False, True, True, True]
    assert correct == [True, None, None, None]


def test_evaluate_rows_writes_scores_and_the_teacher(tmp_path):
    cfg = _cfg("se_score", "abstain_logprob")
    pool = ScriptedPool(GREEDY, SAMPLES, LOGPROBS)
    scorer = scoring.Scorer(cfg, judge=SameTextJudge())
    out = Store(str(tmp_path / "eval"))
    tau = entropy.discrete_semantic_entropy([0, 1, 2, 0]) - 1e-9  # Peru abstains, France answers
    summary, flags = evaluate_rows(cfg, ROWS, pool, F1Judge(), out, scorer=scorer, teacher_tau=tau)
    table = out.read_parquet(RESULTS_FILE)
    assert table.column(col.ANSWER_CORRECT).to_pylist() == [True, False, False]
    assert table.column(col.ABSTAINED).to_pylist() == [False, True, True]
    assert table.column(col.CORRECT).to_pylist() == [True, None, None]
    assert table.column(col.ABSTAIN_LOGPROB).to_pylist() == [-9.0, -2.0, -0.5]
    assert summary["abstained"] == 2 and summary["correct"] == 1 and summary["teacher_tau"] == tau
    assert summary["scores"] == [col.ABSTAIN_LOGPROB, col.SE_SCORE]
    assert flags.abstained == [False, True, True]


def test_evaluate_rows_without_scores_keeps_the_plain_schema(tmp_path):
    out = Store(str(tmp_path / "eval"))
    evaluate_rows(_cfg(), ROWS, ScriptedPool(GREEDY, SAMPLES, LOGPROBS), F1Judge(), out)
    assert out.read_parquet(RESULTS_FILE).schema.names == col.results_schema().names


def _results(scores, own, abstained=None):
    """A results table: the model's own answer's correctness (None: it abstained)."""
    n = len(scores)
    return pa.table(
        {
            col.ID: [str(i) for i in range(n)],
            col.ABSTAINED: abstained or [c is None for c in own],
            col.CORRECT: [c for c in own],
            col.SE_SCORE: scores,
            col.ANSWER_CORRECT: own,
        }
    )


def test_risk_inputs_read_the_models_own_answers():
    t = _results([0.0, 1.0, 2.0], [True, None, False], abstained=[False, True, True])
    d = scoring.risk_inputs(t, col.SE_SCORE)
    assert d["wrong"] == [False, False, True]
    assert d["gives_answer"] == [True, False, True]
    assert d["correct"] == [True, False, False]
    plain = t.drop_columns([col.ANSWER_CORRECT])  # no answer_correct: abstained/correct are the model's
    assert scoring.risk_inputs(plain, col.SE_SCORE)["gives_answer"] == [True, False, False]


def test_certify_results_matches_the_pure_math_and_finds_the_oracle():
    scores = [i / 100 for i in range(100)]
    own = [i < 80 for i in range(100)]
    cal, test = _results(scores, own), _results(scores, own)
    cfg = _cfg("se_score").eval.model_copy(update={"risk_alpha": 0.1, "risk_delta": 0.1})
    out = scoring.certify_results(cal, test, cfg)[col.SE_SCORE]
    direct = risk.certify_threshold(scores, [not c for c in own], 0.1, 0.1)
    assert out["lam"] == direct.lam and out["certified"]
    assert out["test"]["risk"] <= 0.1
    assert out["oracle"]["lambda"] == pytest.approx(0.79)  # answers exactly the right ones
    assert out["oracle"]["risk"] == 0.0
    assert len(out["test_curve"]["aed"]) == 100
    summary = scoring.risk_summary(out)
    assert summary["test"]["engagement"] == out["test"]["engagement"]


def test_certify_results_test_split_guarantee_uses_the_test_size():
    scores = [i / 100 for i in range(100)]
    own = [i < 80 for i in range(100)]
    cal, test = _results(scores, own), _results(scores[:40], own[:40])
    cfg = _cfg("se_score").eval.model_copy(update={"risk_guarantee": "test_split"})
    out = scoring.certify_results(cal, test, cfg)[col.SE_SCORE]
    direct = risk.certify_threshold(scores, [not c for c in own], 0.15, 0.1, test_size=40)
    assert out["lam"] == direct.lam and out["test_size"] == 40 and out["guarantee"] == "test_split"
    assert scoring.risk_summary(out)["guarantee"] == "test_split"
    with pytest.raises(ValueError, match="risk_guarantee=test_split needs evaluated test questions"):
        scoring.certify_results(cal, None, cfg)


def test_certify_results_says_plainly_when_nothing_is_certified():
    cal = _results([0.5] * 5, [False] * 5)
    out = scoring.certify_results(cal, None, _cfg("se_score").eval)[col.SE_SCORE]
    assert not out["certified"] and out["lam"] is None
    assert "abstain on everything" in out["message"]


class _Splits:
    def __init__(self, rows):
        self.rows = rows
        self.evaluated = ["test"]

    def __getitem__(self, name):
        return self.rows[name]


def _scored_results(n, seed, informative=True):
    import numpy as np

    rng = np.random.default_rng(seed)
    se = rng.random(n)
    wrong = rng.random(n) < (0.6 * se if informative else 0.3)
    own = [not w for w in wrong]
    return pa.table(
        {
            col.ID: [f"q{i}" for i in range(n)],
            col.ABSTAINED: [False] * n,
            col.CORRECT: own,
            col.SE_SCORE: se,
            col.ANSWER_CORRECT: own,
        }
    )


def _fake_run(tmp_path):
    """A run's evaluation folders on disk, as se_ray.run.dial reads them."""
    from types import SimpleNamespace

    from se_ray.run.plan import PlanPoint

    root = Store(str(tmp_path / "run"))
    untuned, sweep = root.child("untuned"), root.child("sweep")
    for split, seed in (("validation", 1), ("test", 2)):
        untuned.child(split).makedirs()
        untuned.child(split).write_parquet(RESULTS_FILE, _scored_results(200, seed))
    trials = {}
    for k, tau in enumerate((0.5, 1.0)):
        store = root.child("trials", f"t{k}")
        for split, seed in (("validation", 10 + k), ("test", 20 + k)):
            store.child(split).makedirs()
            table = _scored_results(200, seed, informative=False)
            if tau == 0.5:  # abstains on half: lower risk
                half = [i < 100 for i in range(200)]
                table = table.set_column(1, col.ABSTAINED, pa.array(half))
                table = table.set_column(
                    4,
                    col.ANSWER_CORRECT,
                    pa.array(
                        [
                            None if h else c
                            for h, c in zip(half, table.column(col.CORRECT).to_pylist(), strict=True)
                        ],
                        pa.bool_(),
                    ),
                )
            store.child(split).write_parquet(RESULTS_FILE, table)
        trials[f"d{k}"] = store
    sweep.makedirs()
    sweep.write_json("selection.json", {"semantic_entropy": {"tau": 1.0, "digest": "d1", "aed": 0.5}})
    cfg = _cfg("se_score")
    return SimpleNamespace(
        cfg=cfg,
        folders=SimpleNamespace(untuned=untuned, sweep=sweep),
        seeds=[0],
        spec=lambda digest, seed: SimpleNamespace(store=trials[digest]),
        plan=SimpleNamespace(methods={"semantic_entropy": [PlanPoint(0.5, "d0"), PlanPoint(1.0, "d1")]}),
        splits=_Splits({"test": [{col.ID: f"q{i}"} for i in range(200)]}),
        boundary_flags={},
    )


def test_run_dial_certifies_scores_sweep_and_adds_the_teacher(tmp_path):
    from se_ray.run import dial

    run = _fake_run(tmp_path)
    methods = [{"method": "semantic_entropy", "chosen_tau": 0.3}]
    fields = dial.report_fields(run, methods)
    scores = fields["risk"]["scores"]
    assert [(d["model"], d["score"]) for d in scores] == [
        ("untuned", col.SE_SCORE),
        ("semantic_entropy", col.SE_SCORE),
    ]
    untuned = scores[0]
    assert untuned["certified"] and untuned["n"] == 200
    assert {"test", "uncertified", "oracle"} <= set(untuned)
    sweep = fields["risk"]["sweep"]
    assert [m["tau"] for m in sweep["models"]] == [0.5, 1.0]
    assert sweep["correction"] == "bonferroni"
    if sweep["chosen"] is not None:
        assert sweep["chosen_tau"] == next(m["tau"] for m in sweep["models"] if m["name"] == sweep["chosen"])
    teacher = methods[-1]
    assert teacher["method"] == scoring.TEACHER and teacher["chosen_tau"] == 0.3
    test = run.folders.untuned.child("test").read_parquet(RESULTS_FILE).column(col.SE_SCORE).to_pylist()
    assert teacher["splits"]["test"]["abstained_mean"] == sum(s > 0.3 for s in test)
    on_test = run.boundary_flags[scoring.TEACHER]  # the per-band table and κ show the teacher too
    assert on_test.abstained == [s > 0.3 for s in test] and on_test.ids == [f"q{i}" for i in range(200)]


def test_run_dial_test_split_guarantee_reaches_scores_sweep_and_report(tmp_path):
    from se_ray.report_risk import GUARANTEE_TEST_SPLIT, risk_section
    from se_ray.run import dial

    run = _fake_run(tmp_path)
    run.cfg = run.cfg.model_copy(
        update={"eval": run.cfg.eval.model_copy(update={"risk_guarantee": "test_split"})}
    )
    fields = dial.report_fields(run, [])
    assert fields["risk"]["guarantee"] == "test_split"
    assert {d["test_size"] for d in fields["risk"]["scores"]} == {200}
    assert fields["risk"]["sweep"]["test_size"] == 200
    text = "\n".join(risk_section(fields["risk"], {}, str(tmp_path)))
    assert GUARANTEE_TEST_SPLIT in text and "hypergeometric" in text


def test_run_dial_without_scores_adds_nothing(tmp_path):
    from se_ray.run import dial

    run = _fake_run(tmp_path)
    run.cfg = _cfg()
    methods = []
    assert dial.report_fields(run, methods) == {} and methods == []


def test_risk_section_renders_tables_and_plot(tmp_path):
    from se_ray.report_risk import GUARANTEE, risk_png, risk_section
    from se_ray.run import dial

    fields = dial.report_fields(_fake_run(tmp_path), [])
    folder = tmp_path / "report"
    folder.mkdir()
    lines = risk_section(fields["risk"], {"untuned": "Untuned"}, str(folder))
    text = "\n".join(lines)
    assert "α = 0.15, δ = 0.1" in text and GUARANTEE in text
    assert "| Untuned | semantic entropy of the model's samples | 200 |" in text
    assert "τ = 0.5" in text and "bonferroni" in text
    for d in fields["risk"]["scores"]:
        assert (folder / risk_png(d)).stat().st_size > 1000
    assert risk_section(None, {}, str(folder)) == []
