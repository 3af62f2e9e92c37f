"""The labeling rules (one home for label and run) and the labeller diagnostics."""

import math

import pyarrow as pa
import pytest

from se_ray import columns as col
from se_ray.judges.correctness import ContainsJudge
from se_ray.labeling import (
    SCORE_COLUMNS,
    abstain_by_judgement,
    abstain_by_score,
    label_by_score,
    partition_digest,
    relabel,
    score_diagnostics,
)


def _table(ses, standard, refs=None):
    n = len(ses)
    return pa.table(
        {
            col.ID: [f"q{i}" for i in range(n)],
            col.QUESTION: [f"question {i}" for i in range(n)],
            col.REFERENCES: refs or [[] for _ in range(n)],
            col.STANDARD_ANSWER: standard,
            col.SEMANTIC_ENTROPY: ses,
            col.REGULAR_SEMANTIC_ENTROPY: [s / 2 for s in ses],
            col.EXACT_ENTROPY: [1.0] * n,
        }
    )


def test_abstain_by_score_is_strictly_above_tau():
    assert abstain_by_score([0.0, 0.5, 0.50001, 2.3], 0.5) == [False, False, True, True]


def test_abstain_by_judgement_keeps_right_abstains_wrong_drops_unjudged():
    assert abstain_by_judgement([True, False, None]) == [False, True, None]


def test_relabel_sets_targets_and_drops_unjudged_rows():
    table = _table([0.1, 2.0, 1.0], ["Paris", "Lyon", "Nice"])
    out = relabel(table, [False, True, None], "I don't know.", "r_tuning", None)
    assert out.column(col.ID).to_pylist() == ["q0", "q1"]
    assert out.column(col.TARGET).to_pylist() == ["Paris", "I don't know."]
    assert out.column(col.ABSTAIN).to_pylist() == [False, True]
    assert out.column(col.LABEL_METHOD).to_pylist() == ["r_tuning"] * 2
    assert out.column(col.TAU).to_pylist() == [None, None]


def test_label_by_score_uses_the_methods_column():
    table = _table([0.1, 2.0], ["Paris", "Lyon"])
    se = label_by_score(table, "semantic_entropy", 1.5, "IDK")
    regular = label_by_score(table, "regular_semantic_entropy", 1.5, "IDK")  # half the SE here
    assert se.column(col.TARGET).to_pylist() == ["Paris", "IDK"]
    assert regular.column(col.TARGET).to_pylist() == ["Paris", "Lyon"]
    assert set(SCORE_COLUMNS) == {"semantic_entropy", "regular_semantic_entropy", "exact_entropy"}
    with pytest.raises(ValueError, match="r_tuning"):
        label_by_score(table, "r_tuning", 1.0, "IDK")


def test_partition_digest_depends_on_members_and_flags_not_order():
    a = partition_digest(["x", "y"], [True, False])
    assert a == partition_digest(["y", "x"], [False, True])
    assert a != partition_digest(["x", "y"], [False, False])
    assert a == partition_digest(["x", "y", "z"], [True, False, None])


def test_score_diagnostics_rank_wrong_standard_answers():
    # The standard answer is wrong exactly where SE is high: AUROC 1 for SE; exact entropy is flat.
    table = _table(
        [0.0, 0.2, 1.5, 2.0, 0.7],
        ["The capital is Paris.", "Berlin", "Madrid", "Rome", "Lisbon"],
        [["Paris"], ["Berlin"], ["Lyon"], ["Milan"], []],
    )
    out = score_diagnostics(table, ContainsJudge())
    assert (out["judged"], out["standard_wrong"], out["judge"]) == (4, 2, "contains")
    assert out["semantic_entropy"]["auroc"] == 1.0
    assert out["exact_entropy"]["auroc"] == 0.5
    assert out["semantic_entropy"]["aurac"] > out["exact_entropy"]["aurac"]
    assert score_diagnostics(_table([0.1], ["x"]), ContainsJudge()) is None
    assert not math.isnan(out["regular_semantic_entropy"]["auroc"])
