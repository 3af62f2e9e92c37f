"""The driver of stage 5: read the labels Parquet folder as a Ray Dataset, run the ``TorchTrainer``
and export the result.

A re-run with ``resume=True`` continues the run already in OUTPUT from its latest registered
checkpoint; a fresh run refuses to start over an existing one. The export reads the latest
checkpoint, which is always the end of the last epoch, so its metrics hold every step of the run,
including those done before a resume.
"""

from __future__ import annotations

import logging
import posixpath
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from se_ray import columns as col
from se_ray.config import ConfigError, DataConfig, JobConfig
from se_ray.data import InputError, check_labels_folder, load_questions
from se_ray.runtime import ensure_ray
from se_ray.train.checkpoint import (
    EXPORT_DIR,
    RUN_NAME,
    SELECTED_DIR,
    STATE_DIR,
    TRAIN_DIR,
    read_meta_from,
    restore_point,
    selected_dir,
)
from se_ray.train.export import export_models, write_run_files
from se_ray.train.plan import StepPlan, check_train_config, plan_steps
from se_ray.train.selection import SELECT_LABEL_RATE, SelectionPlan
from se_ray.train.weights import prune_selected
from se_ray.train.worker import train_loop_per_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRun:
    """Where one training run reads and writes, and the steps it will make."""

    labels_fs: Any
    labels_dir: str
    parts: list[str]
    rows: int
    plan: StepPlan
    out_fs: Any
    out_path: str
    prior_step: int | None  # the step of the checkpoint this run resumes from; None when fresh

    @property
    def storage_path(self) -> str:
        return posixpath.join(self.out_path, TRAIN_DIR)

    @property
    def run_path(self) -> str:
        return posixpath.join(self.storage_path, RUN_NAME)


def train_job(
    cfg: JobConfig,
    labels: str,
    output: str,
    resume: bool = False,
    selection_questions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``cfg.sampling.model`` on a labels folder; export to ``output``. Returns a summary.

    ``selection_questions``: the held-out questions ``train.select_checkpoint: label_rate``
    probes with (``se-ray run``: its validation split); None reads ``train.select_questions``.
    """
    started = time.perf_counter()
    run = open_run(cfg, labels, output, resume)
    selection = selection_plan(cfg, run, selection_questions)
    ensure_ray(cfg.ray)
    dataset = _labels_dataset(run)
    fit_start = time.perf_counter()
    checkpoint = _fit(cfg, run, dataset, selection, output)
    fit_s = time.perf_counter() - fit_start
    with tempfile.TemporaryDirectory(prefix="se-ray-export-") as tmp_name:
        tmp = Path(tmp_name)
        state, history = _fetch_meta(checkpoint, run.plan)
        paths = export_models(cfg, _trained_folder(run, checkpoint, state), tmp, output)
        summary = {
            **_summary(cfg, run, state, history),
            **_selection_summary(selection, state, history),
            "fit_s": fit_s,
            "wall_s": time.perf_counter() - started,
            "checkpoint": checkpoint.path,
            **paths,
        }
        write_run_files(cfg, history, summary, tmp, run.out_fs, run.out_path)
    if state.get("selected_step") is not None:  # the exported step's weights stay for a rerun's export
        prune_selected(run.out_fs, posixpath.join(run.storage_path, SELECTED_DIR), {state["selected_step"]})
    _log_done(run, history, summary)
    return {k: v for k, v in summary.items() if k != "summary"}


def open_run(cfg: JobConfig, labels: str, output: str, resume: bool) -> TrainRun:
    """Check the config, find the labels and plan the steps; refuse to clobber a run unless resuming."""
    from se_ray.storage import filesystem

    tcfg = cfg.train
    check_train_config(tcfg)
    labels_fs, labels_dir, parts = check_labels_folder(labels, cfg.storage)
    rows = count_unique_ids(labels_fs, labels_dir)
    out_fs, out_path = filesystem(output, cfg.storage)
    run = TrainRun(
        labels_fs, labels_dir, parts, rows, plan_steps(tcfg, rows, tcfg.num_workers), out_fs, out_path, None
    )
    prior_step = restore_point(out_fs, run.run_path)
    if prior_step is not None:
        if not resume:
            raise FileExistsError(
                f"{output} already holds a training run ({run.run_path}): pass resume=True (--resume) "
                "to continue it, or choose another output"
            )
        logger.info("resuming the run in %s from its checkpoint at step %d", run.run_path, prior_step)
    elif resume:
        logger.info("nothing to resume in %s: starting a fresh run", run.run_path)
    out_fs.create_dir(out_path, recursive=True)
    logger.info(
        "train: %d labels rows from %s -> %d steps (%d epochs x %d), %s ZeRO-%d on %d workers",
        rows,
        labels_dir,
        run.plan.total_steps,
        run.plan.epochs,
        run.plan.steps_per_epoch,
        tcfg.method,
        tcfg.zero_stage,
        tcfg.num_workers,
    )
    return replace(run, prior_step=prior_step)


def selection_plan(
    cfg: JobConfig, run: TrainRun, questions: list[dict[str, Any]] | None
) -> SelectionPlan | None:
    """What ``train.select_checkpoint: label_rate`` probes with; None for ``last``."""
    from se_ray.storage import read_parquet_folder

    tcfg = cfg.train
    if tcfg.select_checkpoint != SELECT_LABEL_RATE:
        return None
    if questions is None:
        if not tcfg.select_questions:
            raise ConfigError(
                "train.select_checkpoint=label_rate needs held-out questions to probe with: set "
                "train.select_questions to a questions file (se-ray run uses its validation split)"
            )
        questions = load_questions(tcfg.select_questions, DataConfig(), cfg.storage).rows
    if not questions:
        raise InputError(f"train.select_checkpoint=label_rate: no questions in {tcfg.select_questions}")
    if col.ABSTAIN not in _columns(run):
        raise InputError(
            f"labels {run.labels_dir} lack column {col.ABSTAIN}: train.select_checkpoint=label_rate "
            "needs the share of abstention labels"
        )
    wanted = [col.ID, col.ABSTAIN]
    table = read_parquet_folder(run.labels_fs, run.labels_dir, columns=wanted, unique_by=col.ID)
    flags = table.column(col.ABSTAIN).to_pylist() if table is not None else []
    return SelectionPlan(
        [(q[col.QUESTION], q.get(col.CONTEXT)) for q in questions],
        sum(bool(f) for f in flags) / max(len(flags), 1),
        cfg.labeling.abstention_text,
    )


def count_unique_ids(fs: Any, folder: str) -> int:
    """Rows training will see: one per id (reads the id column only)."""
    from se_ray.storage import read_parquet_folder

    ids = read_parquet_folder(fs, folder, columns=[col.ID], unique_by=col.ID)
    return 0 if ids is None else ids.num_rows


def _labels_dataset(run: TrainRun) -> Any:
    """The labels as a lazy Ray Dataset of the columns training reads, one row per id (a
    folder with repeated ids, from an older version or a hand-copied part, is deduplicated
    in memory: the part committed first wins)."""
    import ray.data

    from se_ray.storage import read_parquet_folder

    wanted = [c for c in (col.QUESTION, col.CONTEXT, col.TARGET) if c in _columns(run)]
    if run.rows < _total_rows(run):
        table = read_parquet_folder(run.labels_fs, run.labels_dir, columns=wanted, unique_by=col.ID)
        return ray.data.from_arrow(table)
    return _read_labels(run.parts, run.labels_fs).select_columns(wanted)


def _total_rows(run: TrainRun) -> int:
    import pyarrow.parquet as pq

    total = 0
    for part in run.parts:
        with run.labels_fs.open_input_file(part) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def _columns(run: TrainRun) -> list[str]:
    import pyarrow.parquet as pq

    with run.labels_fs.open_input_file(run.parts[0]) as f:
        return pq.ParquetFile(f).schema_arrow.names


def _read_labels(parts: list[str], fs: Any) -> Any:
    """The labels parts as a lazy Ray Dataset whose tasks ask for no CPU.

    The training workers may hold every CPU of the cluster (2 workers x 1 CPU on a 2-core
    machine), and a 1-CPU data task could then never be scheduled: Ray Data warns "Cluster
    resources are not enough to run any task ... may hang forever" and the run hangs.
    Reading a labels table is light I/O (tokenisation runs in the workers' collate
    function), so its tasks take ``num_cpus=0``. Ray 2.60's default (V2) Parquet reader adds
    a ``ListFiles`` task that always asks for 1 CPU, so this read uses the V1 reader, whose
    only tasks are the read tasks that ``ray_remote_args`` configures; the file list is
    already known (``list_parquet`` skipped temporary ``_``/``.`` files).
    """
    import ray.data
    from ray.data.context import DataContext

    ctx = DataContext.get_current()
    saved = getattr(ctx, "use_datasource_v2", False)
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(parts, filesystem=fs, num_cpus=0)
    finally:
        ctx.use_datasource_v2 = saved


def _fit(cfg: JobConfig, run: TrainRun, dataset: Any, selection: SelectionPlan | None, output: str) -> Any:
    """Run (or resume) the ``TorchTrainer``; the run's latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tcfg = cfg.train
    resources: dict[str, float] = {"CPU": tcfg.cpus_per_worker}
    if tcfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": cfg.model_dump(mode="json"),
            "rows": run.rows,
            "selection": selection.to_dict() if selection else None,
            "output": output,  # the workers write a selected step's weights under it
        },
        torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker=resources,
            accelerator_type=tcfg.accelerator_type,
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=run.storage_path,
            storage_filesystem=run.out_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=tcfg.num_to_keep),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
        ),
        datasets={"train": dataset},
    )
    checkpoint = trainer.fit().checkpoint
    if checkpoint is None:
        raise RuntimeError(f"the training run in {run.run_path} finished without a checkpoint")
    return checkpoint


def _fetch_meta(checkpoint: Any, plan: StepPlan) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The checkpoint's (state, history), checked to be the end (no weights are read)."""
    state, history = read_meta_from(checkpoint.filesystem, posixpath.join(checkpoint.path, STATE_DIR))
    if state["step"] != plan.total_steps:
        raise RuntimeError(f"latest checkpoint is at step {state['step']}, expected {plan.total_steps}")
    return state, history


def _trained_folder(run: TrainRun, checkpoint: Any, state: dict[str, Any]) -> str:
    """The folder of the weights to export, relative to OUTPUT: the selected step's, or the last
    checkpoint's ``export/``."""
    step = state.get("selected_step")
    folder = (
        selected_dir(run.storage_path, step)
        if step is not None
        else posixpath.join(checkpoint.path, STATE_DIR, EXPORT_DIR)
    )
    return posixpath.relpath(folder, run.out_path)


def _steps_run_now(history: list[dict[str, Any]], prior_step: int | None) -> list[dict[str, Any]]:
    return [h for h in history if h["step"] > (prior_step or 0)]


def _summary(
    cfg: JobConfig, run: TrainRun, state: dict[str, Any], history: list[dict[str, Any]]
) -> dict[str, Any]:
    """The summary line of ``metrics.jsonl``; throughput counts only the steps this run made."""
    this_run = _steps_run_now(history, run.prior_step)
    timed = this_run or history
    tokens = sum(h["tokens"] for h in timed)
    busy = sum(h["step_s"] for h in timed)
    return {
        "summary": True,
        "final_loss": history[-1]["loss"] if history else None,
        "first_loss": history[0]["loss"] if history else None,
        "steps": run.plan.total_steps,
        "epochs": run.plan.epochs,
        "rows": run.rows,
        "resumed_from_step": run.prior_step,
        "start_step": this_run[0]["step"] if this_run else None,
        "steps_run": state["step"] - (run.prior_step or 0),
        "tokens_per_s": tokens / busy if busy > 0 else None,
        "method": cfg.train.method,
        "zero_stage": cfg.train.zero_stage,
        "num_workers": cfg.train.num_workers,
    }


def _selection_summary(
    selection: SelectionPlan | None, state: dict[str, Any], history: list[dict[str, Any]]
) -> dict[str, Any]:
    """Which step was exported and why: the probes' abstention rates against the labels'."""
    if selection is None:
        return {"selected_step": state["step"], "selection": None}
    return {
        "selected_step": state.get("selected_step"),
        "selection": {
            "rule": SELECT_LABEL_RATE,
            "questions": len(selection.questions),
            "target_rate": selection.target_rate,
            "selected_rate": state.get("selected_rate"),
            "probes": [[h["step"], h["abstention_rate"]] for h in history if "abstention_rate" in h],
        },
    }


def _log_done(run: TrainRun, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    for h in _steps_run_now(history, run.prior_step):  # rank 0 logged these live, on the worker
        logger.debug(
            "step %d/%d epoch %d loss %.4f lr %.3g tokens/s %.0f",
            h["step"],
            run.plan.total_steps,
            h["epoch"],
            h["loss"],
            h["lr"],
            h["tokens_per_s"],
        )
    logger.info(
        "train done: %d steps (%d run now), %d epochs, final loss %s, %.0f tokens/s, %.1f s wall; "
        "exported step %s; adapter=%s merged=%s",
        summary["steps"],
        summary["steps_run"],
        summary["epochs"],
        f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a",
        summary["tokens_per_s"] or 0.0,
        summary["wall_s"],
        summary["selected_step"],
        summary["adapter"],
        summary["merged"],
    )
