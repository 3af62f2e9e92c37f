"""The layout of a run's checkpoints, written by the workers and read by both workers and driver.

Each checkpoint holds every rank's DeepSpeed shard (``deepspeed/``) and, from rank 0, ``se_ray/``:
``state.json`` (step, epoch, micro-batches done), ``metrics.jsonl`` (every step so far) and
``export/`` (the last checkpoint only, with ``train.select_checkpoint: last``: the trained weights as
safetensors). With ``label_rate`` the weights of a selected step are written once, when its probe
selects it, to ``OUTPUT/ray_train/selected/step<N>/`` (``selected_dir``); a checkpoint names the step
it selected, and no checkpoint holds a second copy of the weights. The metrics ride
inside the checkpoint because under Ray Train V2 ``Result.metrics`` may be None and, on a
multi-node cluster, a worker's local file need not be visible to the driver; the checkpoint goes
through Ray Train's own storage layer.
"""

from __future__ import annotations

import json
import logging
import posixpath
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TRAIN_DIR = "ray_train"  # RunConfig.storage_path, under OUTPUT
RUN_NAME = "train"  # RunConfig.name under OUTPUT/ray_train
STATE_DIR = "se_ray"
DS_DIR = "deepspeed"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
EXPORT_DIR = "export"
FULL_WEIGHTS_FILE = "model.safetensors"
SELECTED_FILE = "selected.safetensors"  # older checkpoints' copy of the selected weights (read on resume)
SELECTED_DIR = "selected"  # under OUTPUT/ray_train: the weights of each selected step, written once


def selected_dir(storage_path: str, step: int) -> str:
    """Where the weights of selected step ``step`` live (``storage_path``: OUTPUT/ray_train)."""
    return posixpath.join(storage_path, SELECTED_DIR, f"step{step}")


def write_meta(meta: Path, state: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Write ``state.json`` and ``metrics.jsonl`` into a checkpoint's ``se_ray/`` folder."""
    meta.mkdir(parents=True, exist_ok=True)
    (meta / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    (meta / METRICS_FILE).write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in history))


def read_meta(meta: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(state, metrics history) of a checkpoint's ``se_ray/`` folder."""
    state = json.loads((meta / STATE_FILE).read_text())
    lines = (meta / METRICS_FILE).read_text().splitlines()
    return state, [json.loads(line) for line in lines if line.strip()]


def read_meta_from(fs: Any, meta: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``read_meta`` of a checkpoint's ``se_ray/`` folder in storage, reading nothing else."""
    from se_ray.storage import read_text

    state = json.loads(read_text(fs, posixpath.join(meta, STATE_FILE)))
    lines = read_text(fs, posixpath.join(meta, METRICS_FILE)).splitlines()
    return state, [json.loads(line) for line in lines if line.strip()]


def restore_point(fs: Any, run_path: str) -> int | None:
    """The step of the checkpoint Ray Train V2 will restore in ``run_path``; None without a run.

    V2 restores from its checkpoint-manager snapshot (the checkpoints it registered), not from
    whatever ``checkpoint_*`` folders exist: a driver killed mid-upload can leave an unregistered
    folder behind. The snapshot's ``latest_checkpoint_result`` names the one.
    """
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from se_ray.storage import exists, read_text

    snapshot = posixpath.join(run_path, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    if not exists(fs, snapshot):
        return None
    try:
        latest = json.loads(read_text(fs, snapshot)).get("latest_checkpoint_result") or {}
        name = latest.get("checkpoint_dir_name")
        if not name:
            return 0
        state = json.loads(read_text(fs, posixpath.join(run_path, name, STATE_DIR, STATE_FILE)))
        return int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning(
            "cannot read the restore point of %s (%s); its step count will be unknown", run_path, e
        )
        return 0
