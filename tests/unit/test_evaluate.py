"""Stage 6 without a cluster: judges, prompt and verdict logic, scores, model resolution, and the
pure pieces of `se-ray run` (split, relabeling rules, τ de-duplication, selection, stage markers)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from se_ray import columns as col
from se_ray.config import ABSTENTION_TEXT, SplitConfig, load_config
from se_ray.evaluate import (
    ExactJudge,
    F1Judge,
    bootstrap_mean_interval,
    build_judge,
    combine_verdicts,
    greedy_params,
    judge_answers,
    judge_engine_config,
    judge_prompt,
    lora_engine_config,
    resolve_eval_model,
    results_table,
    retry_indices,
    split_references,
    summarize,
    vllm_lora_rank,
)
from se_ray.metrics import aed, bootstrap_interval
from se_ray.run import (
    Stage,
    aggregate_seeds,
    choose_point,
    config_key,
    entropy_rule,
    group_taus,
    partition_digest,
    plan_sweep,
    r_tuning_rule,
    relabel,
    split_rows,
)

# ---------------------------------------------------------------------------- judges


def test_f1_judge_hand_cases():
    judge = F1Judge(0.5)
    questions = ["q"] * 5
    answers = ["Salzburg, Austria", "It is in Austria", "Vienna", "the 1988 season", ""]
    refs = [["Salzburg, Austria", "Austria"], ["Austria"], ["Salzburg"], ["1988"], ["1988"]]
    # F1: 1.0; "it is in austria" vs "austria": P 1/4 R 1 -> 0.4; 0; "1988 season" vs "1988": 2/3; empty: 0
    assert judge.judge(questions, answers, refs) == [True, False, False, True, False]
    assert F1Judge(0.3).judge(["q"], ["It is in Austria"], [["Austria"]]) == [True]


def test_exact_judge_hand_cases():
    judge = ExactJudge()
    answers = ["The Beatles", "It was the Beatles.", "Beatles fans", "Beat", "the"]
    refs = [["beatles"], ["Beatles"], ["The Beatles"], ["Beatles"], ["The"]]
    # exact after normalisation; containment as whole tokens; "Beat" is no token of it;
    # a reference normalising to nothing matches nothing
    assert judge.judge(["q"] * 5, answers, refs) == [True, True, True, False, False]


def test_judges_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        F1Judge().judge(["q"], ["a", "b"], [["a"]])


def test_judge_prompt_single_reference_is_the_reference_text():
    prompt = judge_prompt("who wrote hamlet", "Shakespeare", ["William Shakespeare"])
    assert prompt == (
        "We are assessing the quality of answers to the following question: who wrote hamlet\n"
        "The expected answer is: William Shakespeare.\n"
        "The proposed answer is: Shakespeare\n"
        "Within the context of the question, does the proposed answer mean the same as the expected answer?"
        " Respond only with yes or no.\nResponse:"
    )


def test_judge_prompt_multi_reference_variant():
    prompt = judge_prompt("where is the sound of music set", "Salzburg", ["Salzburg, Austria", "Austria"])
    assert (
        "The following are expected answers to this question: ['Salzburg, Austria', 'Austria'].\n" in prompt
    )
    assert "mean the same as any of the expected answers? Respond only with yes or no.\nResponse:" in prompt


def test_retry_and_combine_verdicts():
    first = [True, None, False, None]
    assert retry_indices(first) == [1, 3]
    # the retry decides one, the other stays undecided -> no
    assert combine_verdicts(first, [True, None]) == [True, True, False, False]
    assert combine_verdicts([True, False], []) == [True, False]
    with pytest.raises(ValueError):
        combine_verdicts(first, [True])


def test_build_judge_by_name():
    assert isinstance(build_judge(load_config(None, ["eval.judge=f1"])), F1Judge)
    assert build_judge(load_config(None, ["eval.judge=f1", "eval.f1_threshold=0.7"])).threshold == 0.7
    assert isinstance(build_judge(load_config(None, ["eval.judge=exact"])), ExactJudge)
    with pytest.raises(ValueError, match="engine"):
        build_judge(load_config(None, ["eval.judge=llm"]))


# ---------------------------------------------------------------------------- answers and scores


def _rows(n: int, refs=("x",)):
    return [
        {col.ID: f"q{i}", col.QUESTION: f"question {i}", col.REFERENCES: list(refs), col.CONTEXT: None}
        for i in range(n)
    ]


def test_judge_answers_detects_abstentions_before_judging():
    rows = _rows(4, refs=("Paris",))
    answers = ["Paris", "I don't know the answer.", "London", "i do not know"]
    abstained, correct = judge_answers(F1Judge(), rows, answers, ABSTENTION_TEXT)
    assert abstained == [False, True, False, True]
    assert correct == [True, None, False, None]


def test_summarize_counts_and_intervals():
    abstained = [False, False, False, True, True]
    correct = [True, True, False, None, None]
    s = summarize(abstained, correct, bootstrap_samples=200)
    assert (s["num_questions"], s["correct"], s["incorrect"], s["abstained"], s["answered"]) == (
        5,
        2,
        1,
        2,
        3,
    )
    assert s["accuracy"] == pytest.approx(0.4) and s["engagement"] == pytest.approx(0.6)
    assert s["aed"] == pytest.approx(aed(5, 2, 1))
    for name in ("aed", "accuracy", "engagement"):
        low, high = s[f"{name}_ci95"]
        assert low <= s[name] <= high


def test_bootstrap_mean_interval_of_one_model_is_the_single_model_interval():
    abstained = [False, True, False, False, True, False, False, False]
    correct = [True, False, False, True, False, True, False, True]
    for metric in ("aed", "accuracy", "engagement"):
        assert bootstrap_mean_interval([abstained], [correct], metric, 300, seed=3) == pytest.approx(
            bootstrap_interval(abstained, correct, metric, 300, seed=3)
        )


def test_bootstrap_mean_interval_of_identical_models_equals_one_model():
    a, c = [False, True, False, False], [True, False, False, True]
    assert bootstrap_mean_interval([a, a], [c, c], "aed", 200) == pytest.approx(
        bootstrap_mean_interval([a], [c], "aed", 200)
    )
    with pytest.raises(ValueError):
        bootstrap_mean_interval([a, a[:2]], [c, c[:2]])
    assert all(math.isnan(v) for v in bootstrap_mean_interval([a], [c], "aed", 0))


def test_results_table_schema_and_nulls():
    rows = _rows(2)
    table = results_table(rows, ["x", "I don't know the answer."], [False, True], [True, None], "f1")
    assert table.column_names == ["id", "question", "references", "answer", "abstained", "correct", "judge"]
    assert table.column("correct").to_pylist() == [True, None]
    assert table.schema.field("correct").type == pa.bool_()


def test_split_references_rejects_questions_without_references():
    rows = _rows(3)
    rows[1][col.REFERENCES] = None
    keep, rejects = split_references(rows, "in.jsonl")
    assert [r[col.ID] for r in keep] == ["q0", "q2"]
    assert rejects == [
        {"source": "in.jsonl", "line": None, "id": "q1", "reason": "no references: evaluation needs them"}
    ]


def test_greedy_params_take_eval_max_tokens_or_sampling():
    cfg = load_config(None, ["sampling.max_tokens=16"])
    assert greedy_params(cfg) == {"n": 1, "temperature": 0.0, "max_tokens": 16, "stop": ["\n"]}
    assert greedy_params(load_config(None, ["eval.max_tokens=40"]))["max_tokens"] == 40


# ---------------------------------------------------------------------------- model resolution


def test_vllm_lora_rank_rounds_up():
    assert [vllm_lora_rank(r) for r in (1, 4, 8, 9, 64)] == [1, 8, 8, 16, 64]
    with pytest.raises(ValueError):
        vllm_lora_rank(10_000)


def test_lora_engine_config_reuses_a_lora_sampling_engine():
    lora = load_config(None, ["sampling.enable_lora=true"]).sampling
    assert lora_engine_config(lora, 8) is lora
    plain = load_config(None).sampling
    served = lora_engine_config(plain, 16)
    assert (served.enable_lora, served.max_lora_rank, served.model) == (True, 16, plain.model)


def test_resolve_eval_model(tmp_path):
    cfg = load_config(None)
    base = resolve_eval_model(cfg, None)
    assert (base.kind, base.adapter, base.engine) == ("base", None, cfg.sampling)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    a = resolve_eval_model(cfg, str(adapter))
    assert (a.kind, a.adapter, a.engine.enable_lora, a.engine.model) == (
        "adapter",
        str(adapter),
        True,
        cfg.sampling.model,
    )
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    m = resolve_eval_model(cfg, str(merged))
    assert (m.kind, m.adapter, m.engine.model) == ("model", None, str(merged))


def test_judge_engine_is_the_generation_engine_unless_another_model():
    cfg = load_config(None, ["sampling.enable_lora=true"])
    assert judge_engine_config(cfg, cfg.sampling) is cfg.sampling
    other = load_config(None, ["eval.judge_model=some/judge", "eval.judge_tensor_parallel_size=4"])
    judge = judge_engine_config(other, other.sampling)
    assert (judge.model, judge.enable_lora, judge.num_engines, judge.tensor_parallel_size) == (
        "some/judge",
        False,
        1,
        4,
    )


# ---------------------------------------------------------------------------- run: split


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
    from se_ray.config import ConfigError

    with pytest.raises(ConfigError, match="split.validation"):
        split_rows(_questions(10, with_refs_every=5), SplitConfig(train=1, validation=2, test=1))
    with pytest.raises(ConfigError, match="split.train"):
        split_rows(_questions(10), SplitConfig(train=9, validation=2, test=1))


# ---------------------------------------------------------------------------- run: relabeling rules


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
    assert entropy_rule([0.0, 0.5, 0.5000001, 2.3], 0.5) == [False, False, True, True]


def test_r_tuning_rule_keeps_correct_abstains_wrong_drops_unjudged():
    assert r_tuning_rule([True, False, None]) == [False, True, None]


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
        entropy_rule(table.column(col.SEMANTIC_ENTROPY).to_pylist(), 0.6),
        "IDK.",
        "semantic_entropy",
        0.6,
    )
    assert se.column(col.TARGET).to_pylist() == ["A", "B", "IDK.", "IDK."]
    assert se.column(col.TAU).to_pylist() == [0.6] * 4


def test_group_taus_shares_a_trial_between_taus_with_the_same_partition():
    ids = ["a", "b", "c", "d"]
    # discrete SE levels with M=10: 0, 0.325 (9/1), 0.5 (8/2), 0.693 (5/5), 1.609 (2x5)
    scores = [0.0, 0.5004024235381879, 0.6931471805599453, 1.6094379124341003]
    groups = group_taus(ids, scores, [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25])
    # 8/2 is 0.5004 > 0.5: τ = 0.25 and 0.5 both abstain on b, c, d
    assert [g["taus"] for g in groups] == [[0.25, 0.5], [0.75, 1.0, 1.25, 1.5], [1.75, 2.0, 2.25]]
    assert [g["abstained"] for g in groups] == [3, 1, 0]
    assert len({g["digest"] for g in groups}) == 3


def test_partition_digest_depends_on_members_and_flags_not_order():
    assert partition_digest(["a", "b"], [True, False]) == partition_digest(["b", "a"], [False, True])
    assert partition_digest(["a", "b"], [True, False]) != partition_digest(["a", "b"], [False, True])
    assert partition_digest(["a", "b"], [True, None]) != partition_digest(["a", "b"], [True, False])


def test_plan_sweep_dedupes_across_methods():
    cfg = load_config(None, ["sweep.taus=[0.5, 0.75, 2.0]"])
    table = _labels_table()
    judged = {"a": True, "b": True, "c": True, "d": False}  # R-Tuning: abstain on d only
    plan = plan_sweep(cfg, table, judged)
    se, exact = plan["methods"]["semantic_entropy"], plan["methods"]["exact_entropy"]
    rt = plan["methods"]["r_tuning"]
    assert [p["tau"] for p in se] == [p["tau"] for p in exact] == [0.5, 0.75, 2.0]
    assert [p["tau"] for p in rt] == [None]
    # SE abstains on {c, d}, {d}, {}; exact entropy on {b, c, d}, {b, c, d}, {c, d}; R-Tuning on {d}
    assert len({p["digest"] for p in se}) == 3
    assert exact[0]["digest"] == exact[1]["digest"]
    assert exact[2]["digest"] == se[0]["digest"]
    assert rt[0]["digest"] == se[1]["digest"]
    assert len(plan["partitions"]) == 4  # one trial per distinct training set, whatever the method
    assert plan["partitions"][se[0]["digest"]]["rule"] == {"method": "semantic_entropy", "tau": 0.5}
    assert plan["partitions"][exact[0]["digest"]]["abstained"] == 3


def test_choose_point_lowest_aed_first_on_ties():
    points = [{"tau": 0.5, "aed": 0.4}, {"tau": 1.0, "aed": 0.3}, {"tau": 1.5, "aed": 0.3}]
    assert choose_point(points)["tau"] == 1.0
    with pytest.raises(ValueError):
        choose_point([])


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


# ---------------------------------------------------------------------------- run: stage markers


def test_stage_marker_reuse_resume_and_wipe(tmp_path):
    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()
    folder = str(tmp_path / "stage")
    stage = Stage(fs, folder, "k1")
    assert stage.cached() is None
    stage.begin()
    (tmp_path / "stage" / "partial.txt").write_text("work in progress")
    Stage(fs, folder, "k1").begin()  # same key, unfinished: resumed, work kept
    assert (tmp_path / "stage" / "partial.txt").exists()
    stage.finish({"n": 3})
    assert Stage(fs, folder, "k1").cached() == {"n": 3}
    assert Stage(fs, folder, "k2").cached() is None
    Stage(fs, folder, "k2").begin()  # another config: the old folder is emptied
    assert not (tmp_path / "stage" / "partial.txt").exists()


def test_config_key_is_stable_and_sensitive():
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})
