"""Labeling rules: which training questions abstain, and the relabelled table. Used by
``se-ray label`` (one rule at one τ) and ``se-ray run`` (every method over the τ grid)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from se_ray import columns as col
from se_ray import metrics
from se_ray.entropy import label_with_threshold

# The score each entropy method thresholds at τ; r_tuning is decided by a judge instead.
SCORE_COLUMNS = {
    "semantic_entropy": col.SEMANTIC_ENTROPY,
    "regular_semantic_entropy": col.REGULAR_SEMANTIC_ENTROPY,
    "exact_entropy": col.EXACT_ENTROPY,
}


def abstain_by_score(scores: Sequence[float], tau: float, margin: float = 0.0) -> list[bool | None]:
    """SE, regular SE, R-Tuning-U: abstain where the score is strictly above τ. With a margin,
    a question whose score lies within it of τ (|score - τ| <= margin) is None: dropped from
    the training set, its label being the likeliest to be wrong."""
    return [
        None if margin > 0 and abs(float(s) - tau) <= margin else label_with_threshold(float(s), tau)
        for s in scores
    ]


def abstain_by_judgement(correct: Sequence[bool | None]) -> list[bool | None]:
    """R-Tuning as Tjandra et al. ran it: abstain where the standard answer was judged wrong;
    None (no references, cannot be judged) drops the question from the training set."""
    return [None if c is None else not c for c in correct]


def partition_digest(ids: Sequence[str], abstain: Sequence[bool | None]) -> str:
    """Identity of a training set: which questions it holds and which of them abstain."""
    pairs = sorted((i, bool(a)) for i, a in zip(ids, abstain, strict=True) if a is not None)
    return hashlib.sha1(json.dumps(pairs).encode()).hexdigest()


def relabel(
    table: pa.Table, abstain: Sequence[bool | None], abstention_text: str, method: str, tau: float | None
) -> pa.Table:
    """``table`` with ``abstain``/``target``/``tau``/``label_method`` set; rows flagged None are dropped."""
    table = table.filter(pa.array([a is not None for a in abstain], pa.bool_()))
    flags = [bool(a) for a in abstain if a is not None]
    standard = table.column(col.STANDARD_ANSWER).to_pylist()
    n = table.num_rows
    return col.with_columns(
        table,
        {
            col.TAU: ([tau] * n, pa.float64()),
            col.ABSTAIN: (flags, pa.bool_()),
            col.TARGET: (
                [abstention_text if a else s for a, s in zip(flags, standard, strict=True)],
                pa.string(),
            ),
            col.LABEL_METHOD: ([method] * n, pa.string()),
        },
    )


def label_by_score(table: pa.Table, method: str, tau: float, abstention_text: str) -> pa.Table:
    """The entropy-threshold rule on a table that carries the method's score column."""
    if method not in SCORE_COLUMNS:
        raise ValueError(f"labeling.method={method!r} needs references and a judge; use `se-ray run`")
    scores = table.column(SCORE_COLUMNS[method]).to_pylist()
    return relabel(table, abstain_by_score(scores, tau), abstention_text, method, tau)


def score_diagnostics(table: pa.Table, judge: Any) -> dict[str, Any] | None:
    """How well each score predicts that the standard answer is wrong, on the rows with
    references: AUROC (wrong vs score) and AURAC (accuracy kept as the uncertain are rejected).
    None when no row has references. ``judge`` is a correctness judge (``judges.correctness``)."""
    rows = [r for r in table.to_pylist() if r.get(col.REFERENCES)]
    if not rows:
        return None
    correct = judge.judge(
        [r[col.QUESTION] for r in rows],
        [r[col.STANDARD_ANSWER] or "" for r in rows],
        [r[col.REFERENCES] for r in rows],
    )
    wrong = [not c for c in correct]
    out: dict[str, Any] = {"judge": judge.name, "judged": len(rows), "standard_wrong": sum(wrong)}
    for method, column in SCORE_COLUMNS.items():
        scores = [r[column] for r in rows]
        out[method] = {
            "auroc": round(metrics.auroc(wrong, scores), 4),
            "aurac": round(metrics.aurac(correct, scores), 4),
        }
    return out
