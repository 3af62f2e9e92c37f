"""The resumable stages of `se-ray run` without a cluster: stage markers, the split stage, cached
evaluations with their flags, the stage log, and a trial's training set."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from se_ray import columns as col
from se_ray.config import ConfigError, load_config
from se_ray.evaluate import AnswerFlags
from se_ray.labeling import partition_digest
from se_ray.run.plan import Rule, trial_spec
from se_ray.run.stages import (
    FLAGS,
    RunFolders,
    Stage,
    StageLog,
    TrialCounts,
    cached_evaluation,
    evaluate_model,
    split_stage,
)
from se_ray.run.trials import TRIAL_LABEL_COLUMNS, TrialResult, trial_labels
from se_ray.storage import Store


def test_stage_marker_reuse_resume_and_wipe(tmp_path):
    store = Store(str(tmp_path / "stage"))
    stage = Stage(store, "k1")
    assert stage.cached() is None
    stage.begin()
    (tmp_path / "stage" / "partial.txt").write_text("work in progress")
    Stage(store, "k1").begin()  # same key, unfinished: resumed, work kept
    assert (tmp_path / "stage" / "partial.txt").exists()
    stage.finish({"n": 3})
    assert Stage(store, "k1").cached() == {"n": 3}
    assert Stage(store, "k2").cached() is None
    Stage(store, "k2").begin()  # another config: the old folder is emptied
    assert not (tmp_path / "stage" / "partial.txt").exists()


def test_stage_marker_unreadable_is_an_error_not_absent(tmp_path):
    """Not "no state": a stage is rerun (and its folder cleared) only when the file is missing
    (tests/unit/test_stage_state.py covers the rest)."""
    from se_ray.run.stages import StageStateError

    store = Store(str(tmp_path / "stage"))
    store.makedirs()
    (tmp_path / "stage" / "_stage.json").write_text("{not json")
    with pytest.raises(StageStateError, match="does not parse as JSON"):
        Stage(store, "k").cached()


def test_run_folders_layout(tmp_path):
    folders = RunFolders(Store(str(tmp_path)))
    assert folders.labels.location == str(tmp_path / "label" / "labels")
    for name in ("split", "label", "r_tuning", "sweep", "trials", "untuned", "tune"):
        assert getattr(folders, name).location == str(tmp_path / name)


def test_stage_log_leaves_out_stages_that_did_not_happen():
    log = StageLog(split="ran", label="reused", sweep_trials=TrialCounts(2, 1), seed_trials=TrialCounts(0, 0))
    log.evaluations_ran += 3
    assert log.to_dict() == {
        "split": "ran",
        "label": "reused",
        "sweep_trials": {"ran": 2, "reused": 1},
        "seed_trials": {"ran": 0, "reused": 0},
        "evaluations_ran": 3,
    }
    log.r_tuning_judge = "ran"
    assert list(log.to_dict()) == [
        "split",
        "label",
        "r_tuning_judge",
        "sweep_trials",
        "seed_trials",
        "evaluations_ran",
    ]


def _write_questions(path, n):
    path.write_text(
        "".join(
            json.dumps({"id": f"q{i:02d}", "question": f"q {i}?", "answer": [f"a{i}"]}) + "\n"
            for i in range(n)
        )
    )


def test_split_stage_writes_the_splits_and_reuses_them(tmp_path):
    questions = tmp_path / "questions.jsonl"
    ood = tmp_path / "ood.jsonl"
    _write_questions(questions, 20)
    ood.write_text(
        json.dumps({"question": "no references"}) + "\n" + json.dumps({"question": "x?", "answer": ["y"]})
    )
    cfg = load_config(None, ["split.train=6", "split.validation=3", "split.test=4", f"split.ood_input={ood}"])
    folders = RunFolders(Store(str(tmp_path / "run")))
    log = StageLog()
    splits = split_stage(cfg, str(questions), folders, log)
    assert log.split == "ran"
    assert {k: len(v) for k, v in splits.rows.items()} == {"train": 6, "validation": 3, "test": 4, "ood": 1}
    assert splits.evaluated == ["test", "ood"] and splits.adaptation == "ood"
    rejects = folders.split.read_jsonl("rejects.jsonl")
    assert len(rejects) == 1 and "references" in rejects[0]["reason"]
    again = split_stage(cfg, str(questions), folders, log)
    assert log.split == "reused" and again == splits
    other = load_config(None, ["split.train=5", "split.validation=3", "split.test=4"])
    changed = split_stage(other, str(questions), folders, log)
    assert log.split == "ran" and changed.key != splits.key and changed["ood"] == []
    assert changed.evaluated == ["test"] and changed.adaptation == "test"


SMALL = ["split.train=6", "split.validation=3", "split.test=4"]


def test_split_stage_train_inputs_join_only_the_training_split(tmp_path):
    questions, extra = tmp_path / "questions.jsonl", tmp_path / "extra.jsonl"
    _write_questions(questions, 20)
    extra.write_text(
        "".join(json.dumps({"id": f"x{i}", "question": f"x {i}?", "answer": ["y"]}) + "\n" for i in range(3))
        + json.dumps({"id": "x9"})
        + "\n"  # no question: rejected, with its file
    )
    base = ["split.train=6", "split.validation=3", "split.test=4"]
    folders = RunFolders(Store(str(tmp_path / "run")))
    plain = split_stage(load_config(None, base), str(questions), folders, StageLog())
    cfg = load_config(None, [*base, f"split.train_inputs.arithmetic={extra}"])
    mixed = split_stage(cfg, str(questions), folders, StageLog())
    assert [r["id"] for r in mixed["train"]] == [r["id"] for r in plain["train"]] + ["x0", "x1", "x2"]
    assert mixed["validation"] == plain["validation"] and mixed["test"] == plain["test"]
    assert mixed.key != plain.key
    rejects = folders.split.read_jsonl("rejects.jsonl")
    assert [r.get("id") for r in rejects] == ["x9"] and "question" in rejects[0]["reason"]


def test_split_stage_key_without_train_inputs_is_the_key_from_before_them(tmp_path, monkeypatch):
    # The key se-ray computed before split.train_inputs existed: earlier runs keep their split
    # and so their labels.
    monkeypatch.chdir(tmp_path)
    _write_questions(tmp_path / "questions.jsonl", 20)
    cfg = load_config(None, ["split.train=6", "split.validation=3", "split.test=4"])
    splits = split_stage(cfg, "questions.jsonl", RunFolders(Store(str(tmp_path / "run"))), StageLog())
    assert splits.key == "484010cacb87a022"


def test_split_stage_train_inputs_reject_an_id_already_in_a_split(tmp_path):
    questions, extra = tmp_path / "questions.jsonl", tmp_path / "extra.jsonl"
    _write_questions(questions, 20)
    plain = split_stage(
        load_config(None, ["split.train=6", "split.validation=3", "split.test=4"]),
        str(questions),
        RunFolders(Store(str(tmp_path / "plain"))),
        StageLog(),
    )
    taken = plain["test"][0]["id"]
    extra.write_text(json.dumps({"id": taken, "question": "again?", "answer": ["y"]}) + "\n")
    cfg = load_config(None, [*SMALL, f"split.train_inputs.more={extra}"])
    taken_twice = rf"split.train_inputs.more: id '{taken}' of .*extra.jsonl is also in .*questions.jsonl"
    with pytest.raises(ConfigError, match=taken_twice):
        split_stage(cfg, str(questions), RunFolders(Store(str(tmp_path / "run"))), StageLog())


def test_split_stage_train_inputs_need_a_valid_question(tmp_path):
    questions, extra = tmp_path / "questions.jsonl", tmp_path / "extra.jsonl"
    _write_questions(questions, 20)
    extra.write_text(json.dumps({"id": "x"}) + "\n")
    cfg = load_config(None, [*SMALL, f"split.train_inputs.more={extra}"])
    with pytest.raises(ConfigError, match=r"split.train_inputs.more \(.*extra.jsonl\): no valid questions"):
        split_stage(cfg, str(questions), RunFolders(Store(str(tmp_path / "run"))), StageLog())


def _flags():
    return AnswerFlags(["a", "b", "c"], [True, False, False], [None, True, None], [True, True, False])


def test_cached_evaluation_keeps_the_flags_and_needs_them(tmp_path):
    out = Store(str(tmp_path / "eval"))
    Stage(out, "k").begin()
    Stage(out, "k").finish({"aed": 0.5})  # written before flags were kept: run again
    assert cached_evaluation(out, "k") is None
    Stage(out, "k").finish({"aed": 0.5, FLAGS: _flags().to_dict()})
    cached = cached_evaluation(out, "k")
    assert cached is not None and not cached.ran
    assert cached.summary == {"aed": 0.5} and cached.flags == _flags()
    assert cached.flags.answerable_only() == ([True, False], [False, True])
    assert cached_evaluation(out, "other") is None


def test_evaluate_model_reuses_a_finished_evaluation_without_engines(tmp_path):
    out = Store(str(tmp_path / "eval"))
    Stage(out, "k").begin()
    Stage(out, "k").finish({"aed": 0.25, FLAGS: _flags().to_dict()})
    evaluation = evaluate_model(load_config(None), None, [], out, "k", None, {})  # type: ignore[arg-type]
    assert evaluation.summary == {"aed": 0.25} and evaluation.flags == _flags()


# ---------------------------------------------------------------------------- a trial's training set


def _labels(folders: RunFolders) -> pa.Table:
    table = pa.table(
        {
            col.ID: ["a", "b", "c"],
            col.QUESTION: ["qa", "qb", "qc"],
            col.REFERENCES: [["A"], None, ["C"]],
            col.CONTEXT: [None, "ctx", None],
            col.STANDARD_ANSWER: ["A", "B", "C"],
            col.SEMANTIC_ENTROPY: [0.0, 0.7, 1.6],
            col.EXACT_ENTROPY: [0.3, 1.2, 2.3],
            col.TAU: [1.0] * 3,
            col.ABSTAIN: [False, False, True],
            col.TARGET: ["A", "B", "IDK"],
            col.LABEL_METHOD: ["semantic_entropy"] * 3,
        }
    )
    folders.labels.write_parquet("part-0.parquet", col.conform(table, col.label_schema()))
    return table


def test_trial_labels_keep_only_the_training_columns(tmp_path):
    cfg = load_config(None)
    folders = RunFolders(Store(str(tmp_path)))
    _labels(folders)
    rule = Rule("semantic_entropy", 0.5)
    digest = partition_digest(["a", "b", "c"], [False, True, True])
    spec = trial_spec(cfg, folders.trials, "L", "S", digest, rule, 0)
    labels = trial_labels(cfg, spec, folders)
    assert labels.column_names == list(TRIAL_LABEL_COLUMNS)
    idk = cfg.labeling.abstention_text
    assert labels.column(col.TARGET).to_pylist() == ["A", idk, idk]
    assert labels.column(col.CONTEXT).to_pylist() == [None, "ctx", None]
    assert labels.column(col.TAU).to_pylist() == [0.5] * 3
    stale = trial_spec(cfg, folders.trials, "L", "S", "0" * 40, rule, 0)
    with pytest.raises(RuntimeError, match="labels changed"):
        trial_labels(cfg, stale, folders)


def test_r_tuning_trial_labels_drop_unjudged_questions(tmp_path):
    cfg = load_config(None)
    folders = RunFolders(Store(str(tmp_path)))
    _labels(folders)
    folders.r_tuning.write_parquet(
        "standard_judged.parquet",
        pa.table({col.ID: ["a", "b", "c"], "standard_correct": pa.array([True, None, False], pa.bool_())}),
    )
    digest = partition_digest(["a", "b", "c"], [False, None, True])
    spec = trial_spec(cfg, folders.trials, "L", "S", digest, Rule("r_tuning"), 0)
    labels = trial_labels(cfg, spec, folders)
    assert labels.column(col.ID).to_pylist() == ["a", "c"]
    assert labels.column(col.ABSTAIN).to_pylist() == [False, True]
    assert labels.column(col.LABEL_METHOD).to_pylist() == ["r_tuning"] * 2


def test_trial_result_round_trips_through_its_stage_summary():
    result = TrialResult(
        trial="pabc-seed0",
        digest="abc",
        seed=0,
        rule=Rule("semantic_entropy", 0.5),
        rows=8,
        abstained=3,
        model="/x/adapter",
        train={"final_loss": 1.0},
        validation={"aed": 0.4},
        wall_s=1.5,
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert data["rule"] == {"method": "semantic_entropy", "tau": 0.5, "margin": 0.0}
    assert data["trial"] == "pabc-seed0"
    assert TrialResult.from_dict(data) == result
    # a summary written before sweep.tau_margin existed loads as margin 0
    assert TrialResult.from_dict({**data, "rule": {"method": "semantic_entropy", "tau": 0.5}}) == result
