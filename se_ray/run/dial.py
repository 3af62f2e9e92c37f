"""The certified dial and the semantic-entropy teacher in `se-ray run`, from the results its
evaluations already wrote (no model call): the validation split is the calibration set, the
test split measures.

- Per scored model (the untuned one, the chosen SE-tuned one) and per score column in its
  results (``eval.scores``): the certified λ (``scoring.certify_score``), beside the uncertified
  λ with the lowest validation AED and the oracle λ chosen on test.
- The τ sweep (semantic entropy, first seed): the certified τ (``risk.certify_models``).
- The teacher: the untuned model's answers, abstaining where se_score > τ (the SE method's
  chosen τ), as one more method row of the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from se_ray import columns as col
from se_ray import risk, scoring
from se_ray.evaluate import RESULTS_FILE, AnswerFlags, summarize
from se_ray.report import METHOD_LABELS
from se_ray.run.plan import aggregate_seeds
from se_ray.run.results import BOUNDARY_SPLIT, unanswerable_scores
from se_ray.storage import Store

logger = logging.getLogger(__name__)

SE_METHOD = "semantic_entropy"
CALIBRATION, TEST = "validation", "test"


def _results(store: Store) -> Any | None:
    return store.read_parquet(RESULTS_FILE) if store.exists(RESULTS_FILE) else None


def _scored(store: Store) -> tuple[Any, Any] | None:
    cal, test = _results(store.child(CALIBRATION)), _results(store.child(TEST))
    if cal is None or test is None or not any(s in cal.column_names for s in scoring.SCORE_COLUMNS):
        return None
    return cal, test


def _chosen_store(run: Any, method: str) -> Store | None:
    chosen = run.folders.sweep.read_json("selection.json", {}).get(method) or {}
    return run.spec(chosen["digest"], run.seeds[0]).store if chosen.get("digest") else None


def score_dials(run: Any) -> list[dict[str, Any]]:
    """One entry per scored model and score column."""
    models = [("untuned", run.folders.untuned)]
    tuned = _chosen_store(run, SE_METHOD)
    if tuned is not None:
        models.append(("semantic_entropy", tuned))
    dials = []
    for name, store in models:
        found = _scored(store)
        if found is None:
            continue
        dials += [{"model": name, **out} for out in scoring.certify_results(*found, run.cfg.eval).values()]
    return dials


def sweep_dial(run: Any) -> dict[str, Any] | None:
    """Among the SE sweep's models (first seed, one per distinct training set), the τ certified on
    validation with the highest engagement, and every model's test risk."""
    points = run.plan.methods.get(SE_METHOD) or []
    calibrations, tests, taus, test_tables = [], {}, {}, []
    for p in points:
        store = run.spec(p.digest, run.seeds[0]).store
        name = f"τ = {p.tau:g}"
        cal, test = _results(store.child(CALIBRATION)), _results(store.child(TEST))
        if cal is None:
            continue
        test_tables.append(test)
        d = scoring.risk_inputs(cal, col.ABSTAINED)
        calibrations.append(risk.ModelCalibration(name, d["gives_answer"], d["wrong"]))
        taus[name] = p.tau
        if test is not None:
            t = scoring.risk_inputs(test, col.ABSTAINED)
            tests[name] = {
                "risk": sum(t["wrong"]) / max(1, len(t["wrong"])),
                "engagement": sum(t["gives_answer"]) / max(1, len(t["gives_answer"])),
            }
    if not calibrations:
        return None
    e = run.cfg.eval
    test_table = next((t for t in test_tables if t is not None), None)
    if test_table is None and e.risk_guarantee == "test_split":
        return None
    out = risk.certify_models(
        calibrations,
        e.risk_alpha,
        e.risk_delta,
        method=e.risk_p_value,
        test_size=scoring.risk_test_size(e, test_table),
    ).to_dict()
    for m in out["models"]:
        m["tau"], m["test"] = taus[m["name"]], tests.get(m["name"])
    out["chosen_tau"] = taus.get(out["chosen"]) if out["chosen"] else None
    return out


def teacher_entry(run: Any, tau: float, splits: Sequence[str]) -> dict[str, Any] | None:
    """The teacher as a report method: the untuned model's evaluations with se_score > τ abstaining."""
    entry: dict[str, Any] = {
        "method": scoring.TEACHER,
        "label": METHOD_LABELS[scoring.TEACHER],
        "chosen_tau": tau,
        "seeds": 1,
        "splits": {},
    }
    for split in splits:
        table = _results(run.folders.untuned.child(split))
        if table is None or col.SE_SCORE not in table.column_names:
            return None
        answerable = {r[col.ID]: col.is_answerable(r) for r in run.splits[split]}
        d = table.select([col.ID, col.ABSTAINED, col.CORRECT, col.SE_SCORE]).to_pylist()
        abstained, correct = scoring.teacher_flags(
            [r[col.ABSTAINED] for r in d], [r[col.CORRECT] for r in d], [r[col.SE_SCORE] for r in d], tau
        )
        ids = [r[col.ID] for r in d]
        flags = AnswerFlags(ids, abstained, correct, [answerable.get(i, True) for i in ids])
        if split == BOUNDARY_SPLIT:
            run.boundary_flags[scoring.TEACHER] = flags
        summary = summarize(flags, run.cfg.eval.bootstrap_samples)
        a, c = flags.answerable_only()
        entry["splits"][split] = aggregate_seeds([summary], [a], [c], run.cfg.eval.bootstrap_samples)
        entry["splits"][split].update(unanswerable_scores([summary]))
    return entry


def report_fields(run: Any, methods: list[dict[str, Any]]) -> dict[str, Any]:
    """What the run adds to ``report_data.json``: ``risk`` (the dials) and the teacher's method row
    (appended to ``methods`` in place). Empty without scores."""
    if not run.cfg.eval.scores:
        return {}
    e = run.cfg.eval
    fields: dict[str, Any] = {
        "risk": {
            "alpha": e.risk_alpha,
            "delta": e.risk_delta,
            "p_value": e.risk_p_value,
            "guarantee": e.risk_guarantee,
        }
    }
    fields["risk"]["scores"] = score_dials(run)
    fields["risk"]["sweep"] = sweep_dial(run)
    se = next((m for m in methods if m["method"] == SE_METHOD), None)
    tau = se["chosen_tau"] if se and se.get("chosen_tau") is not None else run.cfg.labeling.tau
    teacher = teacher_entry(run, tau, run.splits.evaluated) if col.SE_SCORE in e.scores else None
    if teacher is not None:
        methods.append(teacher)
    return fields
