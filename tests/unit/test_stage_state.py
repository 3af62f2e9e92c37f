"""A stage's ``_stage.json`` fails safe: only a missing file means "no state". A storage error
(throttling, permission) propagates and a file that does not parse stops the run with one
line; in neither case does ``begin()`` clear the folder of a finished stage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from se_ray.lease import OutputError
from se_ray.run.stages import STAGE_FILE, Stage, StageStateError
from se_ray.storage import Store

KEY = "k-123"
SUMMARY = {"aed": 0.41}


class FailingLocal(pafs.FileSystemHandler):
    """The local filesystem, except that touching one file name fails the way a remote store
    does when it throttles or refuses a request (``OSError``)."""

    def __init__(self, name: str, error: OSError, on_stat: bool = False):
        self.local, self.name, self.error, self.on_stat = pafs.LocalFileSystem(), name, error, on_stat

    def _check(self, path: str) -> None:
        if path.rsplit("/", 1)[-1] == self.name:
            raise self.error

    def get_type_name(self):
        return "failing-local"

    def equals(self, other):
        return other is self

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        if self.on_stat:
            for p in paths:
                self._check(p)
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refused")

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_input_stream(self, path):
        self._check(path)
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        self._check(path)
        return self.local.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.local.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path, metadata=metadata)


def _finished_stage(folder: Path) -> Stage:
    """A finished stage with its outputs (a checkpoint and an adapter) on disk."""
    stage = Stage(Store(str(folder)), KEY)
    stage.begin()
    (folder / "train" / "checkpoint_000007").mkdir(parents=True)
    (folder / "train" / "checkpoint_000007" / "model.safetensors").write_bytes(b"weights")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"lora")
    stage.finish(SUMMARY)
    return stage


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _failing(folder: Path, error: OSError, on_stat: bool = False) -> Stage:
    store = Store(str(folder))
    store.fs = pafs.PyFileSystem(FailingLocal(STAGE_FILE, error, on_stat))
    return Stage(store, KEY)


def test_no_state_file_means_absent_and_begin_starts_clean(tmp_path):
    folder = tmp_path / "trial"
    stage = Stage(Store(str(folder)), KEY)
    assert stage.cached() is None
    stage.begin()  # no folder yet: created
    assert json.loads((folder / STAGE_FILE).read_text()) == {"key": KEY, "done": False}
    (folder / STAGE_FILE).unlink()
    (folder / "leftover.parquet").write_bytes(b"half")
    assert stage.cached() is None
    stage.begin()  # a folder without state holds nothing a stage committed: emptied
    assert _files(folder) == {STAGE_FILE: (folder / STAGE_FILE).read_bytes()}


def test_finished_stage_is_reused_and_another_key_starts_over(tmp_path):
    folder = tmp_path / "trial"
    _finished_stage(folder)
    assert Stage(Store(str(folder)), KEY).cached() == SUMMARY
    other = Stage(Store(str(folder)), "another-config")
    assert other.cached() is None
    other.begin()
    assert set(_files(folder)) == {STAGE_FILE}


@pytest.mark.parametrize(
    "text, why",
    [
        ('{"key": "k-123", "done": tr', "does not parse as JSON"),
        ("", "does not parse as JSON"),
        ("[1, 2]", "holds a JSON list, not a stage record"),
    ],
)
def test_unparsable_state_is_one_error_naming_the_file_and_deletes_nothing(tmp_path, text, why):
    folder = tmp_path / "trial"
    _finished_stage(folder)
    (folder / STAGE_FILE).write_text(text)
    before = _files(folder)
    stage = Stage(Store(str(folder)), KEY)
    for call in (stage.cached, stage.begin):
        with pytest.raises(StageStateError) as err:
            call()
        message = str(err.value)
        assert message.startswith(f"stage state {folder / STAGE_FILE} {why}")
        assert "nothing was deleted" in message and "\n" not in message
    assert isinstance(err.value, OutputError)  # the CLI ends with it as one line
    assert _files(folder) == before


@pytest.mark.parametrize(
    "error, on_stat",
    [
        (OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."), False),
        (PermissionError(13, "Permission denied", "_stage.json"), False),
        (OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 28, Timeout"), True),
    ],
)
def test_storage_error_on_state_propagates_and_the_folder_survives(tmp_path, error, on_stat):
    folder = tmp_path / "trial"
    _finished_stage(folder)
    before = _files(folder)
    stage = _failing(folder, error, on_stat)
    with pytest.raises(type(error)) as err:
        stage.cached()
    assert err.value is error
    with pytest.raises(type(error)):
        stage.begin()
    assert _files(folder) == before  # the checkpoint, the adapter and the finished state
    assert Stage(Store(str(folder)), KEY).cached() == SUMMARY  # once the store answers: reused


def test_not_found_from_the_store_still_means_absent(tmp_path):
    """A store that lists the file but answers "not found" on read (deleted in between)."""
    folder = tmp_path / "trial"
    folder.mkdir()
    (folder / STAGE_FILE).write_text(json.dumps({"key": KEY, "done": True, "summary": SUMMARY}))
    stage = _failing(folder, FileNotFoundError(2, "Path does not exist", "_stage.json"))
    assert stage.cached() is None
