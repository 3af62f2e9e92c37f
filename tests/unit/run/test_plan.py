"""The pure half of `se-ray run`: split, relabeling rules, τ de-duplication, the plan, the trial
keys, the choice of τ and the seed aggregation."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from se_ray import columns as col
from se_ray.config import ABSTENTION_TEXT, ConfigError, SplitConfig, load_config
from se_ray.labeling import abstain_by_judgement, abstain_by_score, partition_digest, relabel
from se_ray.run.plan import (
    Partition,
    Rule,
    SweepPoint,
    aggregate_seeds,
    choose_point,
    config_key,
    group_taus,
    plan_sweep,
    split_rows,
    trial_spec,
)
from se_ray.storage import Store

# ---------------------------------------------------------------------------- split


def _questions(n: int, with_refs_every: int = 1):
    return [
        {
            col.ID: f"q{i:03d}",
            col.QUESTION: f"question {i}",
            col.REFERENCES: [f"a{i}"] if i % with_refs_every == 0 else None,
            col.CONTEXT: None,
        }
        for i in range(n)
    ]


def test_split_rows_is_seeded_disjoint_and_holds_references_out():
    rows = _questions(40, with_refs_every=2)
    cfg = SplitConfig(train=12, validation=5, test=7, seed=1)
    parts = split_rows(rows, cfg)
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [12, 5, 7]
    ids = [r[col.ID] for k in ("train", "validation", "test") for r in parts[k]]
    assert len(set(ids)) == len(ids)
    assert all(r[col.REFERENCES] for r in parts["validation"] + parts["test"])
    assert split_rows(rows, cfg) == parts
    assert split_rows(rows, SplitConfig(train=12, validation=5, test=7, seed=2)) != parts


def test_split_rows_too_small_is_a_config_error():
    with pytest.raises(ConfigError, match="split.validation"):
        split_rows(_questions(10, with_refs_every=5), SplitConfig(train=1, validation=2, test=1))
    with pytest.raises(ConfigError, match="split.train"):
        split_rows(_questions(10), SplitConfig(train=9, validation=2, test=1))


# ---------------------------------------------------------------------------- relabeling rules


def _labels_table():
    return pa.table(
        {
            col.ID: ["a", "b", "c", "d"],
            col.QUESTION: ["qa", "qb", "qc", "qd"],
            col.STANDARD_ANSWER: ["A", "B", "C", "D"],
            col.SEMANTIC_ENTROPY: [0.0, 0.5, 0.6931471805599453, 1.6094379124341003],
            col.EXACT_ENTROPY: [0.3250829733914482, 1.2, 2.302585092994046, 2.302585092994046],
            col.TAU: [1.0] * 4,
            col.ABSTAIN: [False, False, False, True],
            col.TARGET: ["A", "B", "C", ABSTENTION_TEXT],
            col.LABEL_METHOD: ["semantic_entropy"] * 4,
        }
    )


def test_entropy_rule_abstains_strictly_above_tau():
    assert abstain_by_score([0.0, 0.5, 0.5000001, 2.3], 0.5) == [False, False, True, True]


def test_r_tuning_rule_keeps_correct_abstains_wrong_drops_unjudged():
    assert abstain_by_judgement([True, False, None]) == [False, True, None]


def test_rule_abstain_reads_the_method_score_or_the_verdicts():
    table = _labels_table()
    assert Rule("semantic_entropy", 0.6).abstain(table, None) == [False, False, True, True]
    assert Rule("exact_entropy", 1.2).abstain(table, None) == [False, False, True, True]
    assert Rule("r_tuning").abstain(table, {"a": True, "b": False, "d": True}) == [False, True, None, False]
    assert Rule("r_tuning").abstain(table, None) == [None] * 4
    with pytest.raises(ValueError, match="τ"):
        Rule("semantic_entropy").abstain(table, None)


def test_relabel_rewrites_targets_and_drops_unjudged_rows():
    table = _labels_table()
    out = relabel(table, [True, False, None, False], "IDK.", "r_tuning", None)
    assert out.column(col.ID).to_pylist() == ["a", "b", "d"]
    assert out.column(col.ABSTAIN).to_pylist() == [True, False, False]
    assert out.column(col.TARGET).to_pylist() == ["IDK.", "B", "D"]
    assert out.column(col.LABEL_METHOD).to_pylist() == ["r_tuning"] * 3
    assert out.column(col.TAU).to_pylist() == [None] * 3
    se = relabel(
        table,
        abstain_by_score(table.column(col.SEMANTIC_ENTROPY).to_pylist(), 0.6),
        "IDK.",
        "semantic_entropy",
        0.6,
    )
    assert se.column(col.TARGET).to_pylist() == ["A", "B", "IDK.", "IDK."]
    assert se.column(col.TAU).to_pylist() == [0.6] * 4


# ---------------------------------------------------------------------------- τ plan


def test_group_taus_shares_a_trial_between_taus_with_the_same_partition():
    ids = ["a", "b", "c", "d"]
    # discrete SE levels with M=10: 0, 0.325 (9/1), 0.5 (8/2), 0.693 (5/5), 1.609 (2x5)
    scores = [0.0, 0.5004024235381879, 0.6931471805599453, 1.6094379124341003]
    groups = group_taus(ids, scores, [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25])
    # 8/2 is 0.5004 > 0.5: τ = 0.25 and 0.5 both abstain on b, c, d
    assert [g.taus for g in groups] == [[0.25, 0.5], [0.75, 1.0, 1.25, 1.5], [1.75, 2.0, 2.25]]
    assert [g.abstained for g in groups] == [3, 1, 0]
    assert len({g.digest for g in groups}) == 3


def test_partition_digest_depends_on_members_and_flags_not_order():
    assert partition_digest(["a", "b"], [True, False]) == partition_digest(["b", "a"], [False, True])
    assert partition_digest(["a", "b"], [True, False]) != partition_digest(["a", "b"], [False, True])
    assert partition_digest(["a", "b"], [True, None]) != partition_digest(["a", "b"], [True, False])


def test_plan_sweep_dedupes_across_methods():
    cfg = load_config(None, ["sweep.taus=[0.5, 0.75, 2.0]"])
    table = _labels_table()
    judged = {"a": True, "b": True, "c": True, "d": False}  # R-Tuning: abstain on d only
    plan = plan_sweep(cfg.sweep, table, judged)
    se, exact = plan.methods["semantic_entropy"], plan.methods["exact_entropy"]
    rt = plan.methods["r_tuning"]
    assert [p.tau for p in se] == [p.tau for p in exact] == [0.5, 0.75, 2.0]
    assert [p.tau for p in rt] == [None]
    # SE abstains on {c, d}, {d}, {}; exact entropy on {b, c, d}, {b, c, d}, {c, d}; R-Tuning on {d}
    assert len({p.digest for p in se}) == 3
    assert exact[0].digest == exact[1].digest
    assert exact[2].digest == se[0].digest
    assert rt[0].digest == se[1].digest
    assert len(plan.partitions) == 4  # one trial per distinct training set, whatever the method
    assert plan.partitions[se[0].digest].rule == Rule("semantic_entropy", 0.5)
    assert plan.partitions[exact[0].digest].abstained == 3
    assert plan.digests() == list(dict.fromkeys(p.digest for p in se + rt + exact))


def test_plan_json_keeps_its_layout():
    cfg = load_config(None, ["sweep.taus=[0.5]", "sweep.methods=[semantic_entropy, r_tuning]"])
    plan = plan_sweep(cfg.sweep, _labels_table(), {"a": True, "b": None, "c": True, "d": False})
    data = plan.to_dict()
    se = data["methods"]["semantic_entropy"][0]
    assert se == {"tau": 0.5, "digest": plan.methods["semantic_entropy"][0].digest}
    rt = data["partitions"][data["methods"]["r_tuning"][0]["digest"]]
    assert rt == {"rule": {"method": "r_tuning", "tau": None, "margin": 0.0}, "rows": 3, "abstained": 1}
    assert isinstance(plan.partitions[se["digest"]], Partition)


def test_trial_spec_key_follows_results_not_operational_settings(tmp_path):
    cfg = load_config(None)
    trials = Store(str(tmp_path / "trials"))
    rule = Rule("semantic_entropy", 0.5)
    spec = trial_spec(cfg, trials, "L", "S", "d" * 40, rule, 0)
    assert spec.name == "p" + "d" * 10 + "-seed0"
    assert spec.store.location == str(tmp_path / "trials" / f"{spec.name}-{spec.key[:8]}")
    assert trial_spec(cfg, trials, "L", "S", "d" * 40, rule, 1).key != spec.key
    assert trial_spec(cfg, trials, "L2", "S", "d" * 40, rule, 0).key != spec.key
    lr = load_config(None, ["train.learning_rate=1e-4"])
    assert trial_spec(lr, trials, "L", "S", "d" * 40, rule, 0).key != spec.key
    tp = load_config(None, ["eval.judge_tensor_parallel_size=4"])  # operational: same results
    assert trial_spec(tp, trials, "L", "S", "d" * 40, rule, 0).key == spec.key
    judge = load_config(None, ["eval.judge=f1"])
    assert trial_spec(judge, trials, "L", "S", "d" * 40, rule, 0).key != spec.key


# ---------------------------------------------------------------------------- choice and seeds


def _point(tau, aed):
    return SweepPoint(tau, f"t{tau}", f"d{tau}", {"validation": {"aed": aed}})


def test_choose_point_lowest_aed_first_on_ties():
    points = [_point(0.5, 0.4), _point(1.0, 0.3), _point(1.5, 0.3)]
    assert choose_point(points).tau == 1.0
    with pytest.raises(ValueError):
        choose_point([])


def test_sweep_point_report_entry():
    p = SweepPoint(0.5, "p1-seed0", "abc", {"validation": {"aed": 0.4}, "test": {"aed": 0.3}})
    assert p.to_report() == {
        "tau": 0.5,
        "trial": "p1-seed0",
        "digest": "abc",
        "validation": {"aed": 0.4},
        "test": {"aed": 0.3},
    }
    assert "digest" not in SweepPoint(None, "untuned", None, {}).to_report()


def test_aggregate_seeds_mean_sd_and_interval():
    per_seed = [
        {
            "num_questions": 4,
            "aed": 0.4,
            "accuracy": 0.5,
            "engagement": 1.0,
            "correct": 2,
            "incorrect": 2,
            "abstained": 0,
        },
        {
            "num_questions": 4,
            "aed": 0.2,
            "accuracy": 0.75,
            "engagement": 1.0,
            "correct": 3,
            "incorrect": 1,
            "abstained": 0,
        },
    ]
    abstained = [[False] * 4, [False] * 4]
    correct = [[True, True, False, False], [True, True, True, False]]
    out = aggregate_seeds(per_seed, abstained, correct, 200)
    assert out["aed_mean"] == pytest.approx(0.3) and out["aed_sd"] == pytest.approx(math.sqrt(0.02))
    assert out["seeds"] == 2 and out["aed_per_seed"] == [0.4, 0.2]
    assert out["aed_ci95"][0] <= out["aed_ci95"][1]
    one = aggregate_seeds(per_seed[:1], abstained[:1], correct[:1], 200)
    assert one["aed_sd"] is None


def test_config_key_is_stable_and_sensitive():
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})


def test_tau_margin_drops_the_questions_nearest_tau():
    scores = [0.0, 1.3, 1.45, 1.6, 1.75, 1.9, 2.3]
    assert abstain_by_score(scores, 1.6, 0.2) == [False, False, None, None, None, True, True]
    assert abstain_by_score(scores, 1.6, 0.0) == [False, False, False, False, True, True, True]


def test_plan_sweep_with_a_margin_trains_on_fewer_rows_and_tells_them_apart():
    table = _labels_table()
    keys = ["sweep.taus=[0.6]", "sweep.methods=[semantic_entropy]"]
    plain = plan_sweep(load_config(None, keys).sweep, table, None)
    margin = plan_sweep(load_config(None, [*keys, "sweep.tau_margin=0.2"]).sweep, table, None)
    scores = table.column(col.SEMANTIC_ENTROPY).to_pylist()
    near = sum(abs(s - 0.6) <= 0.2 for s in scores)
    assert near > 0
    (p0,) = plain.partitions.values()
    (p1,) = margin.partitions.values()
    assert p0.rows == table.num_rows and p1.rows == table.num_rows - near
    assert p1.rule == Rule("semantic_entropy", 0.6, 0.2)
    assert plain.digests() != margin.digests()
    assert p1.rule.abstain(table, None).count(None) == near
    with pytest.raises(ConfigError, match="tau_margin"):
        load_config(None, ["sweep.tau_margin=-0.1"])
    with pytest.raises(ConfigError, match="leaves no training question"):
        plan_sweep(load_config(None, [*keys, "sweep.tau_margin=5"]).sweep, table, None)
