"""se_ray.train.export: what a finished run leaves in OUTPUT, without training anything."""

from __future__ import annotations

import json

import pytest

from se_ray.config import load_config
from se_ray.storage import filesystem
from se_ray.train.export import assert_no_pickles, publish, write_run_files


def test_pickles_are_refused(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    assert_no_pickles(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(RuntimeError, match="pickle"):
        assert_no_pickles(tmp_path)


def test_publish_replaces_the_destination(tmp_path):
    fs, _ = filesystem(str(tmp_path))
    dest = tmp_path / "out" / "adapter"
    dest.mkdir(parents=True)
    (dest / "stale.json").write_text("{}")
    local = tmp_path / "tmp" / "adapter"
    local.mkdir(parents=True)
    (local / "fresh.json").write_text("{}")
    publish(local, fs, str(dest))
    assert [p.name for p in dest.iterdir()] == ["fresh.json"]
    assert not local.exists()


def test_run_files_hold_every_step_then_the_summary(tmp_path):
    cfg = load_config(None, [])
    fs, out = filesystem(str(tmp_path / "out"))
    fs.create_dir(out, recursive=True)
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    write_run_files(cfg, history, {"summary": True, "steps": 2}, tmp_path, fs, out)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [*history, {"summary": True, "steps": 2}]
    assert load_config(tmp_path / "out" / "train_config.yaml").model_dump() == cfg.model_dump()
    assert (tmp_path / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
