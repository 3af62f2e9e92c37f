"""se_ray.train.job, the driver side that needs no cluster: finding labels, refusing to clobber a run."""

from __future__ import annotations

import json

import pytest

from se_ray.config import load_config
from se_ray.data import InputError, check_labels_folder
from se_ray.train.checkpoint import STATE_DIR, STATE_FILE
from se_ray.train.job import count_unique_ids, open_run


def _labels(folder, n=4):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    ids = [f"q{i}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "question": ids, "target": ids}), folder / "part-00000.parquet")
    return folder


def test_labels_folder_skips_temporary_parts_and_accepts_the_run_folder(tmp_path):
    labels = _labels(tmp_path / "run" / "labels", n=2)
    (labels / "_part-00001.parquet").write_text("half written")
    (labels / ".part-00002.parquet.tmp").write_text("half written")
    for given in (labels, tmp_path / "run"):
        fs, folder, parts = check_labels_folder(str(given), None)
        assert folder == str(labels)
        assert [p.rsplit("/", 1)[-1] for p in parts] == ["part-00000.parquet"]
        assert count_unique_ids(fs, folder) == 2
    with pytest.raises(InputError, match="no committed Parquet parts"):
        check_labels_folder(str(tmp_path), None)


def test_a_fresh_run_refuses_an_existing_one_and_resume_continues_it(tmp_path):
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    cfg = load_config(None, ["train.global_batch_size=2", "train.micro_batch_size=1", "train.num_workers=2"])
    labels = str(_labels(tmp_path / "labels"))
    output = str(tmp_path / "out")
    fresh = open_run(cfg, labels, output, resume=True)  # nothing to resume: a fresh run
    assert fresh.prior_step is None and fresh.rows == 4
    assert fresh.run_path == str(tmp_path / "out" / "ray_train" / "train")

    run = tmp_path / "out" / "ray_train" / "train"
    (run / "checkpoint_1" / STATE_DIR).mkdir(parents=True)
    (run / "checkpoint_1" / STATE_DIR / STATE_FILE).write_text(json.dumps({"step": 3}))
    latest = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_1"}}
    (run / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).write_text(json.dumps(latest))
    with pytest.raises(FileExistsError, match="resume"):
        open_run(cfg, labels, output, resume=False)
    assert open_run(cfg, labels, output, resume=True).prior_step == 3


def test_repeated_ids_count_once(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = _labels(tmp_path / "labels", n=3)
    extra = pa.table({"id": ["q0", "q9"], "question": ["a", "b"], "target": ["a", "b"]})
    pq.write_table(extra, labels / "part-1.parquet")
    fs, folder, _ = check_labels_folder(str(labels), None)
    assert count_unique_ids(fs, folder) == 4  # ids q0, q1, q2 and q9


def test_selection_plan_takes_the_labels_abstention_share_and_the_held_out_questions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from se_ray.config import ConfigError
    from se_ray.train.job import selection_plan

    folder = tmp_path / "labels"
    folder.mkdir()
    ids = ["a", "b", "c", "d", "a"]  # a repeated id counts once (the first part's row)
    flags = [True, False, False, True, False]
    table = pa.table({"id": ids, "question": ids, "target": ids, "abstain": flags})
    pq.write_table(table.slice(0, 4), folder / "part-00000.parquet")
    pq.write_table(table.slice(4), folder / "part-00001.parquet")
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text('{"question": "Capital of France?"}\n{"question": "Who?", "context": "A text."}\n')
    on = ["train.select_checkpoint=label_rate"]
    run = open_run(load_config(None, on), str(folder), str(tmp_path / "out"), resume=False)

    assert selection_plan(load_config(None, []), run, None) is None  # select_checkpoint=last
    given = selection_plan(load_config(None, on), run, [{"question": "Q?"}])
    assert given.questions == [("Q?", None)] and given.target_rate == 0.5
    assert given.abstention_text == "I don't know the answer."
    from_file = selection_plan(load_config(None, [*on, f"train.select_questions={held_out}"]), run, None)
    assert from_file.questions == [("Capital of France?", None), ("Who?", "A text.")]
    with pytest.raises(ConfigError, match="train.select_questions"):
        selection_plan(load_config(None, on), run, None)

    pq.write_table(table.drop_columns(["abstain"]), folder / "part-00000.parquet")
    (folder / "part-00001.parquet").unlink()
    with pytest.raises(InputError, match="lack column abstain"):
        selection_plan(load_config(None, on), run, [{"question": "Q?"}])
