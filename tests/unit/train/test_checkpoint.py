"""se_ray.train.checkpoint: the state/metrics files and the restore point Ray Train V2 will use."""

from __future__ import annotations

import json

from se_ray.storage import filesystem
from se_ray.train.checkpoint import STATE_DIR, STATE_FILE, read_meta, restore_point, write_meta


def test_meta_round_trips(tmp_path):
    state = {"step": 3, "epoch": 1, "micro": 2, "attempt": 0}
    history = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 0.5}]
    write_meta(tmp_path / STATE_DIR, state, history)
    assert read_meta(tmp_path / STATE_DIR) == (state, history)
    write_meta(tmp_path / "empty", state, [])
    assert read_meta(tmp_path / "empty") == (state, [])


def _snapshot(run, latest):
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    run.mkdir(parents=True, exist_ok=True)
    (run / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).write_text(json.dumps({"latest_checkpoint_result": latest}))


def test_restore_point_follows_the_registered_checkpoint(tmp_path):
    fs, _ = filesystem(str(tmp_path))
    run = tmp_path / "run"
    assert restore_point(fs, str(run)) is None  # no run at all
    _snapshot(run, None)
    assert restore_point(fs, str(run)) == 0  # a run that registered no checkpoint yet
    for name, step in (("checkpoint_a", 2), ("checkpoint_b", 5)):
        (run / name / STATE_DIR).mkdir(parents=True)
        (run / name / STATE_DIR / STATE_FILE).write_text(json.dumps({"step": step}))
    _snapshot(run, {"checkpoint_dir_name": "checkpoint_a"})
    assert restore_point(fs, str(run)) == 2  # the registered one, not the newest folder


def test_an_unreadable_restore_point_counts_as_step_0(tmp_path):
    fs, _ = filesystem(str(tmp_path))
    _snapshot(tmp_path / "run", {"checkpoint_dir_name": "checkpoint_gone"})
    assert restore_point(fs, str(tmp_path / "run")) == 0
