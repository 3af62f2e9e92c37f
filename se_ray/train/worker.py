"""What every Ray Train worker runs: load the model, hand it to DeepSpeed ZeRO (gloo on CPU, NCCL on
GPU), stream its shard of the labels, and checkpoint through ``ray.train.report``.

Resuming: Ray Train V2 hands a re-run trainer (same ``RunConfig(name, storage_path)``) its latest
registered checkpoint through ``ray.train.get_checkpoint()``. The workers load their DeepSpeed
shards (model, optimizer, LR scheduler), skip the finished epochs and the micro-batches already done
in the current one, and carry on from the next optimizer step.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from se_ray.config import JobConfig, TrainConfig
from se_ray.train.checkpoint import (
    DS_DIR,
    EXPORT_DIR,
    SELECTED_FILE,
    STATE_DIR,
    TRAIN_DIR,
    read_meta,
    write_meta,
)
from se_ray.train.examples import TokenizeCollate, stream_collate, with_last
from se_ray.train.plan import StepPlan, deepspeed_config, plan_steps, warmup_cosine
from se_ray.train.selection import SelectionPlan, improves, probe_abstention_rate, probe_steps
from se_ray.train.weights import (
    LoadedModel,
    gather_trainable,
    load_train_model,
    param_groups,
    publish_selected,
    restore_selected,
    write_export,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Worker:
    """One worker's fixed setup: its place in the group, its plan and its DeepSpeed engine."""

    cfg: TrainConfig
    plan: StepPlan
    rank: int
    world: int
    engine: Any
    loaded: LoadedModel  # tokenizer, base dtype, ZeRO-3 loading config (kept alive)
    selection: SelectionPlan | None = None
    selection_prompts: tuple[tuple[int, ...], ...] = ()  # token ids (prompts.question_prompt_ids)
    probes: frozenset[int] = frozenset()
    selected_store: tuple[Any, str] | None = None  # (fs, OUTPUT/ray_train): where selected weights go

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def export_dtype(self) -> Any:
        """LoRA matrices stay fp32 (small); full weights are exported in the base folder's dtype."""
        return self.loaded.base_dtype if self.cfg.method == "full" else None


@dataclass
class Progress:
    """Where the run stands: optimizer steps done, micro-batches done, metrics of every step so far."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # micro-batches done in ``epoch``
    attempt: int = 0  # 0 for a fresh run, one more on each resume
    restored_from: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    selected_step: int | None = None  # train.select_checkpoint=label_rate: the step to export
    selected_rate: float | None = None
    checkpointed: list[int] = field(default_factory=list)  # selected steps the latest checkpoints name


@dataclass
class _Window:
    """The sums of one accumulation window, reported as one optimizer step."""

    loss: float = 0.0
    tokens: int = 0
    lr: float = 0.0
    start: float = field(default_factory=time.perf_counter)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs; ``config`` = {"job": JobConfig dump, "rows": int}."""
    loop_start = time.perf_counter()
    job = JobConfig.model_validate(config["job"])
    # DeepSpeed picks its accelerator at first use; name it so a CPU run on a GPU host stays on CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if job.train.use_gpu else "cpu")
    import ray.train

    _log_to_console()
    worker = _set_up(job, int(config["rows"]))
    worker = _with_selection(worker, job, config)
    progress = _restore(worker)
    if worker.rank == 0:
        _log_setup(worker, progress, time.perf_counter() - loop_start)
    cfg = worker.cfg
    shard = ray.train.get_dataset_shard("train")
    collate = stream_collate(TokenizeCollate(worker.tokenizer, job.sampling.answer_style, cfg.max_length))
    start_epoch, skip = progress.epoch, progress.micro
    for epoch in range(start_epoch, cfg.epochs):
        batches = shard.iter_torch_batches(
            batch_size=cfg.micro_batch_size,
            collate_fn=collate,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed + epoch) if cfg.shuffle_buffer else None,
        )
        _train_epoch(worker, progress, batches, epoch, done=skip if epoch == start_epoch else 0)
    if worker.rank == 0:
        logger.info("train: worker loop done at step %d", progress.step)


def _set_up(job: JobConfig, rows: int) -> Worker:
    """Load the model (fp32 on CPU, bf16 on GPU), wrap it with LoRA or train it whole, start DeepSpeed."""
    import deepspeed
    import ray.train
    import torch

    cfg = job.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    plan = plan_steps(cfg, rows, world)
    torch.manual_seed(cfg.seed)
    if not cfg.use_gpu:
        # torch starts a thread per core in every worker; the workers share the node's cores.
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    ds_config = deepspeed_config(cfg, world)
    loaded = load_train_model(job, ds_config)
    optimizer = torch.optim.AdamW(param_groups(loaded.model, cfg.weight_decay), lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=loaded.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return Worker(cfg, plan, rank, world, engine, loaded)


def _with_selection(w: Worker, job: JobConfig, config: dict[str, Any]) -> Worker:
    """The worker with its selection probe's prompts, steps and storage (``train.select_checkpoint``)."""
    if not config.get("selection"):
        return w
    from se_ray.prompts import question_prompt_ids
    from se_ray.storage import filesystem

    plan = SelectionPlan.from_dict(config["selection"])
    style = job.sampling.answer_style
    prompts = tuple(tuple(question_prompt_ids(w.tokenizer, q, style, c)) for q, c in plan.questions)
    steps = probe_steps(w.cfg.select_every_steps, w.plan.steps_per_epoch, w.plan.total_steps)
    fs, out_path = filesystem(config["output"], job.storage)
    store = (fs, posixpath.join(out_path, TRAIN_DIR))
    return replace(
        w, selection=plan, selection_prompts=prompts, probes=frozenset(steps), selected_store=store
    )


def _train_epoch(
    w: Worker, progress: Progress, batches: Iterable[dict[str, Any]], epoch: int, done: int
) -> None:
    """Train one epoch, skipping the ``done`` micro-batches that the checkpoint resumed from holds."""
    window = _Window()
    micro = -1
    for micro, (batch, is_last) in enumerate(with_last(batches)):
        if micro < done:
            continue
        if micro == done:
            window = _Window()  # time the window from its first trained batch, not the skipped ones
        boundary = is_last or (micro + 1) % w.plan.grad_accum == 0
        _accumulate(w, window, batch, micro, boundary)
        if boundary:
            _end_step(w, progress, window, epoch, micro, is_last)
            window = _Window()
    if micro + 1 != w.plan.micro_batches_per_epoch:
        raise RuntimeError(
            f"worker {w.rank} got {micro + 1} micro-batches in epoch {epoch + 1}, planned "
            f"{w.plan.micro_batches_per_epoch}: the dataset changed under the run"
        )


def _accumulate(w: Worker, window: _Window, batch: dict[str, Any], micro: int, boundary: bool) -> None:
    """Forward and backward one micro-batch; DeepSpeed steps the optimizer on a window's boundary."""
    engine = w.engine
    engine.set_gradient_accumulation_boundary(boundary)
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    loss = engine(**batch).loss
    # Scaled by the real window size, not DeepSpeed's: an epoch's last window may be short.
    share = w.plan.window_size(micro)
    engine.backward(loss / share, scale_wrt_gas=False)
    window.lr = engine.get_lr()[0]  # read before step(): the LR this step trains with
    engine.step()
    window.loss += loss.item() / share
    window.tokens += int(batch["attention_mask"].sum().item())


def _end_step(w: Worker, progress: Progress, window: _Window, epoch: int, micro: int, is_last: bool) -> None:
    """Record a finished optimizer step and report it, with a checkpoint when one is due."""
    import ray.train

    progress.step += 1
    progress.epoch, progress.micro = (epoch + 1, 0) if is_last else (epoch, micro + 1)
    row = _step_metrics(w, progress, window, epoch)
    if w.selection is not None and progress.step in w.probes:
        _probe(w, progress, row)
    progress.history.append(row)
    if w.rank == 0:
        logger.info(
            "step %d/%d epoch %d/%d loss %.4f lr %.3g tokens/s %.0f",
            progress.step,
            w.plan.total_steps,
            epoch + 1,
            w.cfg.epochs,
            row["loss"],
            row["lr"],
            row["tokens_per_s"],
        )
    every = w.cfg.checkpoint_every_steps
    if is_last or (every and progress.step % every == 0):
        saving = time.perf_counter()
        _save_checkpoint(w, progress, row)
        if w.rank == 0:
            logger.info("checkpoint at step %d saved in %.1f s", progress.step, time.perf_counter() - saving)
    else:
        ray.train.report(row)


def _probe(w: Worker, progress: Progress, row: dict[str, Any]) -> None:
    """Probe the abstention rate; keep this step's weights if it is the closest to the labels' yet."""
    assert w.selection is not None
    started = time.perf_counter()
    target = w.selection.target_rate
    rate = probe_abstention_rate(
        w.engine.module,
        w.tokenizer,
        w.selection_prompts,
        w.selection.abstention_text,
        w.rank,
        w.world,
        chunk_size=w.cfg.select_batch_size,
        synced=w.cfg.zero_stage == 3 and w.world > 1,
    )
    row["abstention_rate"] = rate
    kept = improves(rate, progress.selected_rate, target)
    if kept:  # every rank decides alike: the rate is summed over all of them
        progress.selected_step, progress.selected_rate = progress.step, rate
        trained = gather_trainable(w.engine, w.cfg.zero_stage, w.rank, w.export_dtype)  # a collective
        if w.rank == 0:  # written once; the selections that no checkpoint names are dropped
            assert w.selected_store is not None and trained is not None
            keep = {progress.step, *progress.checkpointed}
            publish_selected(w.engine, w.cfg, trained, *w.selected_store, progress.step, keep)
    if w.rank == 0:
        logger.info(
            "probe at step %d: abstains on %.0f%% of %d held-out questions (labels: %.0f%%)%s; %.1f s",
            progress.step,
            100 * rate,
            len(w.selection_prompts),
            100 * target,
            ", the closest yet" if kept else "",
            time.perf_counter() - started,
        )


def _step_metrics(w: Worker, progress: Progress, window: _Window, epoch: int) -> dict[str, Any]:
    """The step's metrics row, loss and tokens summed over the workers (a collective: every rank calls it)."""
    import torch
    import torch.distributed as dist

    totals = torch.tensor([window.loss, float(window.tokens)], dtype=torch.float64, device=w.engine.device)
    dist.all_reduce(totals)
    elapsed = time.perf_counter() - window.start
    return {
        "step": progress.step,
        "epoch": epoch + 1,
        "loss": totals[0].item() / w.world,
        "lr": window.lr,
        "tokens": int(totals[1].item()),
        "tokens_per_s": totals[1].item() / max(elapsed, 1e-9),
        "step_s": elapsed,
        "attempt": progress.attempt,
    }


def _save_checkpoint(w: Worker, progress: Progress, metrics: dict[str, Any]) -> None:
    """Every rank: its DeepSpeed shard; rank 0: state, metrics and export. Then report it."""
    import ray.train

    state = {
        "step": progress.step,
        "epoch": progress.epoch,
        "micro": progress.micro,
        "attempt": progress.attempt,
        "total_steps": w.plan.total_steps,
        "world_size": w.world,
        "method": w.cfg.method,
        "zero_stage": w.cfg.zero_stage,
        "selected_step": progress.selected_step,
        "selected_rate": progress.selected_rate,
    }
    tmp = Path(tempfile.mkdtemp(prefix="se-ray-ckpt-"))
    try:
        w.engine.save_checkpoint(
            str(tmp / DS_DIR), tag=f"step{progress.step}", exclude_frozen_parameters=w.cfg.method == "lora"
        )
        # The weights to export, once: the last checkpoint's (a selected step's are already stored).
        export_now = progress.step == w.plan.total_steps and progress.selected_step is None
        trained = gather_trainable(w.engine, w.cfg.zero_stage, w.rank, w.export_dtype) if export_now else None
        if w.rank == 0:
            if trained is not None:
                write_export(w.engine, w.cfg, trained, tmp / STATE_DIR / EXPORT_DIR)
            write_meta(tmp / STATE_DIR, state, progress.history)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress.selected_step is not None:
        progress.checkpointed = [*progress.checkpointed, progress.selected_step][-w.cfg.num_to_keep :]


def _restore(w: Worker) -> Progress:
    """Load the run's latest checkpoint into the engine, if there is one; where to carry on from."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as folder:
        saved, history = read_meta(Path(folder) / STATE_DIR)
        if saved.get("total_steps") != w.plan.total_steps or saved.get("world_size") != w.plan.world_size:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} was made for {saved.get('total_steps')} steps on "
                f"{saved.get('world_size')} workers; this run plans {w.plan.total_steps} on "
                f"{w.plan.world_size}: resume with the same labels and train settings, or start a new output"
            )
        load_path, _ = w.engine.load_checkpoint(
            str(Path(folder) / DS_DIR), load_module_strict=w.cfg.method == "full"
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {checkpoint.path}")
        selected = saved.get("selected_step")
        if w.rank == 0 and selected is not None:
            assert w.selected_store is not None
            legacy = Path(folder) / STATE_DIR / SELECTED_FILE
            restore_selected(w.engine, w.cfg, *w.selected_store, selected, legacy)
    return Progress(
        step=saved["step"],
        epoch=saved["epoch"],
        micro=saved["micro"],
        attempt=saved.get("attempt", 0) + 1,
        restored_from=saved["step"],
        history=history,
        selected_step=saved.get("selected_step"),
        selected_rate=saved.get("selected_rate"),
        checkpointed=[selected] if selected is not None else [],
    )


def _log_setup(w: Worker, progress: Progress, setup_s: float) -> None:
    trainable = sum(p.numel() for p in w.engine.module.parameters() if p.requires_grad)
    logger.info(
        "train: %s ZeRO-%d on %d workers, %d trainable params, %d rows, "
        "%d steps (%d/epoch, grad accum %d)%s; set up in %.1f s",
        w.cfg.method,
        w.cfg.zero_stage,
        w.world,
        trainable,
        w.plan.rows,
        w.plan.total_steps,
        w.plan.steps_per_epoch,
        w.plan.grad_accum,
        f", resumed at step {progress.step}" if progress.restored_from is not None else "",
        setup_s,
    )


def _log_to_console() -> None:
    """Ray Train workers start with no logging set up: without a handler, INFO lines would be lost."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
