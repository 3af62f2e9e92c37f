"""Stage 5: fine-tune on the labeled stream with Ray Train and DeepSpeed ZeRO.

A recipe in three layers:

* pure functions, tested without a cluster: ``deepspeed_config``, ``lora_config``,
  ``plan_steps``, ``warmup_cosine``, ``tokenize_example`` and ``pad_batch``;
* ``train_loop_per_worker(config)``: what every Ray Train worker runs. It rebuilds the typed
  ``JobConfig`` from the dict it receives, loads the model (fp32 on CPU, bf16 on GPU), wraps
  it with LoRA (peft) or trains it whole, hands it to ``deepspeed.initialize`` (ZeRO-2/3,
  gloo on CPU, NCCL on GPU) and streams its shard of the labels dataset, tokenised in the
  stream by the batch collate function (the driver never materialises the rows);
* ``train_job(cfg, labels, output, resume)``: the driver. It reads the labels Parquet folder
  as a Ray Dataset, runs the ``TorchTrainer`` and exports the result.

Checkpoints (one per epoch and every ``checkpoint_every_steps`` optimizer steps) go through
``ray.train.report(metrics, checkpoint=...)``. Each worker writes its own DeepSpeed shard into
a local folder and reports it; Ray Train merges the shards into one checkpoint folder in the
run's storage. Rank 0 adds ``se_ray/``: ``state.json`` (step, epoch, micro-batches done),
``metrics.jsonl`` (every step so far) and ``export/`` (the trained weights as safetensors:
the peft adapter for LoRA, the full weights in the base dtype for full fine-tuning).

Why the metrics ride inside the checkpoint: under Ray Train V2 ``Result.metrics`` may be
None, and on a multi-node cluster the driver cannot assume that a worker's local file is
visible to it. The checkpoint is written through Ray Train's own storage layer (local disk,
NFS, S3 or GCS alike) and the last checkpoint is always the end of the last epoch, so its
``metrics.jsonl`` holds every step of the run, including the steps done before a resume.

Resuming: Ray Train V2 restores a run from the checkpoint-manager snapshot that it keeps in
``<storage_path>/<name>/`` (``CheckpointManager._maybe_load_state_from_storage``), so
re-running the trainer with the same ``RunConfig(name, storage_path)`` makes
``ray.train.get_checkpoint()`` return the latest registered checkpoint. The workers then
``load_checkpoint`` their DeepSpeed shards (model, optimizer and LR scheduler), skip the
finished epochs and the micro-batches already done in the current epoch, and carry on from
the next optimizer step. A fresh (non-resume) run refuses to start over an existing run.

Export runs on the driver from the latest checkpoint: ``OUTPUT/adapter/`` (peft
``save_pretrained``: adapter_config.json + adapter_model.safetensors, loadable by vLLM as a
``LoRARequest``) and ``OUTPUT/merged/`` (safetensors, config, tokenizer, in the dtype of the
base folder). No pickles are ever exported. ``OUTPUT/metrics.jsonl``, ``OUTPUT/loss.png`` and
``OUTPUT/train_config.yaml`` sit beside them.

Importing this module loads no torch, ray, deepspeed or peft.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from se_ray import columns as col
from se_ray.config import ConfigError, JobConfig, TrainConfig

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss
RUN_NAME = "train"  # RunConfig.name under OUTPUT/ray_train
STATE_DIR = "se_ray"  # inside each checkpoint: state.json, metrics.jsonl, export/
DS_DIR = "deepspeed"  # inside each checkpoint: the DeepSpeed shards of every rank
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
EXPORT_DIR = "export"
FULL_WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# ----------------------------------------------------------------------------------------
# Pure pieces (no cluster, no torch at import)
# ----------------------------------------------------------------------------------------


def check_train_config(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Reject combinations that cannot train or would export nothing, with a one-line reason."""
    world = cfg.num_workers if world_size is None else world_size
    if world < 1:
        raise ConfigError(f"train: world_size={world} must be >= 1")
    per_step = cfg.micro_batch_size * world
    if cfg.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.global_batch_size} is not a multiple of "
            f"train.micro_batch_size*world_size={cfg.micro_batch_size}*{world}={per_step}"
        )
    if cfg.method == "full" and not cfg.export_merged:
        raise ConfigError(
            "train.method=full with train.export_merged=false would export nothing: "
            "the merged model is the only export of full fine-tuning"
        )
    if cfg.method == "lora" and not cfg.lora_target_modules:
        raise ConfigError("train.lora_target_modules is empty: LoRA needs at least one module to adapt")


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of one run.

    The optimizer (torch AdamW) and the warm-up + cosine LR schedule are built by the
    training loop and handed to ``deepspeed.initialize`` (see ``warmup_cosine``), so that
    the schedule knows the real number of optimizer steps; they are not in this dict.
    """
    check_train_config(cfg, world_size)
    grad_accum = cfg.global_batch_size // (cfg.micro_batch_size * world_size)
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": cfg.use_gpu,
    }
    if cfg.zero_stage == 3:
        # The trainable weights are gathered explicitly for export (GatheredParameters);
        # DeepSpeed's own 16-bit consolidation on save is not needed.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.gradient_clipping,
        # bf16 on GPU; CPU trains in fp32 (bf16 matmuls are slow or missing on many CPUs).
        "bf16": {"enabled": cfg.use_gpu},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the client torch.optim.AdamW
        "steps_per_print": 2**31 - 1,  # progress is reported through ray.train.report
        "wall_clock_breakdown": False,
    }


def lora_config(cfg: TrainConfig):
    """The peft ``LoraConfig`` of a LoRA run (paper: r=8 on q_proj and v_proj)."""
    if cfg.method != "lora":
        raise ConfigError(f"train.method={cfg.method} has no LoRA config (set train.method=lora)")
    if not cfg.lora_target_modules:
        raise ConfigError("train.lora_target_modules is empty: LoRA needs at least one module to adapt")
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
    )


@dataclass(frozen=True)
class StepPlan:
    """How many micro-batches and optimizer steps a run makes (identical on every worker).

    Ray Train splits the dataset with ``streaming_split(equal=True)``: every worker gets
    ``rows // world_size`` rows per epoch. The last micro-batch of an epoch may be short, and
    the last accumulation window of an epoch may hold fewer than ``grad_accum`` micro-batches:
    it still ends in an optimizer step, so that an epoch always ends on a step boundary.
    """

    rows: int
    world_size: int
    rows_per_worker: int
    micro_batches_per_epoch: int
    grad_accum: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    warmup_steps: int

    def window_size(self, micro_index: int) -> int:
        """Micro-batches in the accumulation window holding ``micro_index`` (0-based, in epoch)."""
        full_windows = self.micro_batches_per_epoch // self.grad_accum
        if micro_index // self.grad_accum < full_windows:
            return self.grad_accum
        return self.micro_batches_per_epoch - full_windows * self.grad_accum


def plan_steps(cfg: TrainConfig, rows: int, world_size: int) -> StepPlan:
    check_train_config(cfg, world_size)
    rows_per_worker = rows // world_size
    if rows_per_worker < 1:
        raise ConfigError(
            f"the labels hold {rows} rows: too few for train.num_workers={world_size} "
            "(each worker needs at least one)"
        )
    grad_accum = cfg.global_batch_size // (cfg.micro_batch_size * world_size)
    micro = math.ceil(rows_per_worker / cfg.micro_batch_size)
    steps_per_epoch = math.ceil(micro / grad_accum)
    total = steps_per_epoch * cfg.epochs
    return StepPlan(
        rows=rows,
        world_size=world_size,
        rows_per_worker=rows_per_worker,
        micro_batches_per_epoch=micro,
        grad_accum=grad_accum,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.epochs,
        total_steps=total,
        warmup_steps=int(round(cfg.warmup_ratio * total)),
    )


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0.

    The multiplier is never 0 on a step that runs: warm-up starts at 1/warmup_steps and the
    cosine ends one step short of 0.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def tokenize_example(
    tokenizer: Any,
    question: str,
    context: str | None,
    target: str,
    style: str,
    max_length: int,
) -> dict[str, list[int]]:
    """One SFT example: the sampling prompt, then the target and EOS; loss on the target only.

    The prompt is ``render_prompt`` (the same chat-templated prompt that sampling and
    evaluation use); prompt and target are tokenised separately, so that the target tokens
    are exactly the ones the model would generate after the prompt. Over ``max_length``, the
    prompt is cut from the left (its end, the assistant header, stays) and the target keeps
    at least half of the budget.
    """
    from se_ray.prompts import render_prompt

    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: cannot end the target")
    prompt_ids = list(
        tokenizer(render_prompt(tokenizer, question, style, context), add_special_tokens=False)["input_ids"]
    )
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(target_ids) > max_length:
        keep_prompt = min(len(prompt_ids), max(max_length - len(target_ids), max_length // 2))
        target_ids = target_ids[: max_length - keep_prompt]
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :] if keep_prompt else []
    input_ids = prompt_ids + target_ids
    return {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
        "attention_mask": [1] * len(input_ids),
    }


def pad_batch(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad tokenised examples into int64 numpy arrays (labels padded with -100)."""
    import numpy as np

    if not examples:
        raise ValueError("pad_batch needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    out = {
        "input_ids": np.full((len(examples), width), pad_token_id, dtype=np.int64),
        "labels": np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64),
        "attention_mask": np.zeros((len(examples), width), dtype=np.int64),
    }
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        out["input_ids"][i, :n] = e["input_ids"]
        out["labels"][i, :n] = e["labels"]
        out["attention_mask"][i, :n] = e["attention_mask"]
    return out


def _text_or_none(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


class TokenizeCollate:
    """``collate_fn`` of ``iter_torch_batches``: raw label rows -> padded torch tensors.

    Tokenisation runs here, in the worker, batch by batch as the shard streams in.
    """

    def __init__(self, tokenizer: Any, style: str, max_length: int):
        self.tokenizer = tokenizer
        self.style = style
        self.max_length = max_length
        pad = tokenizer.pad_token_id
        self.pad_token_id = tokenizer.eos_token_id if pad is None else pad

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        missing = [c for c in (col.QUESTION, col.TARGET) if c not in batch]
        if missing:
            raise KeyError(f"labels rows lack column(s) {missing}; got {sorted(batch)}")
        contexts = batch.get(col.CONTEXT)
        examples = []
        for i, question in enumerate(batch[col.QUESTION]):
            target = _text_or_none(batch[col.TARGET][i])
            if target is None:
                raise ValueError(f"labels row with question {question!r} has an empty target")
            context = _text_or_none(contexts[i]) if contexts is not None else None
            examples.append(
                tokenize_example(self.tokenizer, str(question), context, target, self.style, self.max_length)
            )
        return {k: torch.from_numpy(v) for k, v in pad_batch(examples, self.pad_token_id).items()}


def _stream_collate(inner: TokenizeCollate) -> Any:
    """Wrap a ``TokenizeCollate`` as the numpy-batch collate class Ray Data expects."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class _Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            return inner(batch)

    return _Collate()


def _with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Yield (item, is_last) with one item of look-ahead."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


# ----------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _gather_trainable(engine: Any, zero_stage: int, rank: int, dtype: Any = None) -> dict[str, Any] | None:
    """The trainable weights, whole, on rank 0, in ``dtype`` if given (a collective: every rank calls it).

    One parameter at a time, so that ZeRO-3 never holds more than one gathered weight.
    """
    import deepspeed

    state: dict[str, Any] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        gather = (
            deepspeed.zero.GatheredParameters([p], modifier_rank=None) if zero_stage == 3 else nullcontext()
        )
        with gather:
            if rank == 0:
                state[name] = p.detach().to("cpu", dtype=dtype or p.dtype, copy=True).contiguous()
    return state if rank == 0 else None


def _write_export(engine: Any, cfg: TrainConfig, state: dict[str, Any], folder: Path) -> None:
    """Rank 0: the trained weights as safetensors (peft adapter, or the full weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.method == "lora":
        engine.module.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file(state, str(folder / FULL_WEIGHTS_FILE), {"format": "pt"})


def _save_checkpoint(
    engine: Any,
    cfg: TrainConfig,
    rank: int,
    state: dict[str, Any],
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
    base_dtype: Any,
) -> None:
    """Every rank: its DeepSpeed shard; rank 0: state, metrics and export. Then report it."""
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix="se-ray-ckpt-"))
    try:
        engine.save_checkpoint(
            str(tmp / DS_DIR), tag=f"step{state['step']}", exclude_frozen_parameters=cfg.method == "lora"
        )
        # LoRA matrices stay fp32 (small); full weights are exported in the base folder's dtype.
        export_dtype = base_dtype if cfg.method == "full" else None
        trained = _gather_trainable(engine, cfg.zero_stage, rank, export_dtype)
        if rank == 0:
            meta = tmp / STATE_DIR
            _write_export(engine, cfg, trained, meta / EXPORT_DIR)
            (meta / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
            (meta / METRICS_FILE).write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in history))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore(engine: Any, cfg: TrainConfig, plan: StepPlan) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load the latest checkpoint of the run, if any: (state, metrics history so far)."""
    import ray.train

    state = {"step": 0, "epoch": 0, "micro": 0, "attempt": 0, "restored_from_step": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return state, []
    with checkpoint.as_directory() as folder:
        saved = json.loads((Path(folder) / STATE_DIR / STATE_FILE).read_text())
        if saved.get("total_steps") != plan.total_steps or saved.get("world_size") != plan.world_size:
            raise RuntimeError(
                f"checkpoint {checkpoint.path} was made for {saved.get('total_steps')} steps on "
                f"{saved.get('world_size')} workers; this run plans {plan.total_steps} on {plan.world_size}: "
                "resume with the same labels and train settings, or start a new output"
            )
        load_path, _ = engine.load_checkpoint(
            str(Path(folder) / DS_DIR), load_module_strict=cfg.method == "full"
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {checkpoint.path}")
        lines = (Path(folder) / STATE_DIR / METRICS_FILE).read_text().splitlines()
    history = [json.loads(line) for line in lines if line.strip()]
    state = {
        "step": saved["step"],
        "epoch": saved["epoch"],
        "micro": saved["micro"],
        "attempt": saved.get("attempt", 0) + 1,
        "restored_from_step": saved["step"],
    }
    return state, history


def _config_dtype(config: Any) -> Any:
    """The torch dtype a model folder's config declares (fp32 when it declares none)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _log_to_console() -> None:
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs; ``config`` = {"job": JobConfig dump, "rows": int}."""
    loop_start = time.perf_counter()
    job = JobConfig.model_validate(config["job"])
    cfg = job.train
    # DeepSpeed picks its accelerator at first use; name it so a CPU run on a GPU host stays on CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.use_gpu else "cpu")

    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from se_ray.models import resolve_model

    _log_to_console()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    plan = plan_steps(cfg, int(config["rows"]), world)
    torch.manual_seed(cfg.seed)
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    model_path = resolve_model(job.sampling.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base_dtype = _config_dtype(AutoConfig.from_pretrained(model_path))  # what the export is written in
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if cfg.use_gpu else torch.float32
    )
    model.config.use_cache = False
    if cfg.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world)
    )
    device = engine.device

    state, history = _restore(engine, cfg, plan)
    if rank == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info(
            "train: %s ZeRO-%d on %d workers, %d trainable params, %d rows, "
            "%d steps (%d/epoch, grad accum %d)%s; set up in %.1f s",
            cfg.method,
            cfg.zero_stage,
            world,
            trainable,
            plan.rows,
            plan.total_steps,
            plan.steps_per_epoch,
            plan.grad_accum,
            f", resumed at step {state['step']}" if state["restored_from_step"] is not None else "",
            time.perf_counter() - loop_start,
        )

    shard = ray.train.get_dataset_shard("train")
    collate = _stream_collate(TokenizeCollate(tokenizer, job.sampling.answer_style, cfg.max_length))
    step = state["step"]
    start_epoch, skip = state["epoch"], state["micro"]
    window_loss = 0.0
    window_tokens = 0
    window_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        batches = shard.iter_torch_batches(
            batch_size=cfg.micro_batch_size,
            collate_fn=collate,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed + epoch) if cfg.shuffle_buffer else None,
        )
        done_in_epoch = skip if epoch == start_epoch else 0
        micro = -1
        for micro, (batch, is_last) in enumerate(_with_last(batches)):
            if micro < done_in_epoch:
                continue  # consumed before the checkpoint this run resumed from
            if micro == done_in_epoch:
                window_start = time.perf_counter()
            boundary = is_last or (micro + 1) % plan.grad_accum == 0
            engine.set_gradient_accumulation_boundary(boundary)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss / plan.window_size(micro), scale_wrt_gas=False)
            lr = engine.get_lr()[0]
            engine.step()
            window_loss += loss.item() / plan.window_size(micro)
            window_tokens += int(batch["attention_mask"].sum().item())
            if not boundary:
                continue

            step += 1
            totals = torch.tensor([window_loss, float(window_tokens)], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            elapsed = time.perf_counter() - window_start
            row = {
                "step": step,
                "epoch": epoch + 1,
                "loss": totals[0].item() / world,
                "lr": lr,
                "tokens": int(totals[1].item()),
                "tokens_per_s": totals[1].item() / max(elapsed, 1e-9),
                "step_s": elapsed,
                "attempt": state["attempt"],
            }
            history.append(row)
            if rank == 0:
                logger.info(
                    "step %d/%d epoch %d/%d loss %.4f lr %.3g tokens/s %.0f",
                    step,
                    plan.total_steps,
                    epoch + 1,
                    cfg.epochs,
                    row["loss"],
                    lr,
                    row["tokens_per_s"],
                )
            every = cfg.checkpoint_every_steps
            if is_last or (every and step % every == 0):
                done = {"epoch": epoch + 1, "micro": 0} if is_last else {"epoch": epoch, "micro": micro + 1}
                ckpt_state = {
                    "step": step,
                    **done,
                    "attempt": state["attempt"],
                    "total_steps": plan.total_steps,
                    "world_size": world,
                    "method": cfg.method,
                    "zero_stage": cfg.zero_stage,
                }
                saving = time.perf_counter()
                _save_checkpoint(engine, cfg, rank, ckpt_state, history, row, base_dtype)
                if rank == 0:
                    logger.info("checkpoint at step %d saved in %.1f s", step, time.perf_counter() - saving)
            else:
                ray.train.report(row)
            window_loss, window_tokens = 0.0, 0
            window_start = time.perf_counter()
        if micro + 1 != plan.micro_batches_per_epoch:
            raise RuntimeError(
                f"worker {rank} got {micro + 1} micro-batches in epoch {epoch + 1}, planned "
                f"{plan.micro_batches_per_epoch}: the dataset changed under the run"
            )
    if rank == 0:
        logger.info("train: worker loop done at step %d", step)


# ----------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------


def _labels_folder(labels: str, storage: Any) -> tuple[Any, str, list[str]]:
    """(filesystem, folder, committed Parquet parts) of a labels folder or its run folder."""
    from se_ray.storage import filesystem, list_parquet

    fs, inner = filesystem(labels, storage)
    parts = list_parquet(fs, inner)
    if not parts:
        sub = posixpath.join(inner, "labels")
        parts = list_parquet(fs, sub)
        if parts:
            inner = sub
    if not parts:
        raise FileNotFoundError(f"no committed labels Parquet parts in {labels} (nor in {labels}/labels)")
    return fs, inner, parts


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


def _count_rows(fs: Any, parts: list[str]) -> int:
    import pyarrow.parquet as pq

    total = 0
    for part in parts:
        with fs.open_input_file(part) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def _ensure_ray(cfg: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, namespace=cfg.ray.namespace)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, namespace=cfg.ray.namespace)


def _restore_point(fs: Any, run_path: str) -> int | None:
    """The step of the checkpoint Ray Train V2 will restore in ``run_path``; None without a run.

    V2 restores from its checkpoint-manager snapshot (the checkpoints it registered), not
    from whatever ``checkpoint_*`` folders exist: a driver killed mid-upload can leave an
    unregistered folder behind. The snapshot's ``latest_checkpoint_result`` names the one.
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


def _assert_no_pickles(folder: Path) -> None:
    bad = [p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if bad:
        raise RuntimeError(f"export {folder} holds pickle files {bad}: only safetensors may be exported")


def _export_merged(cfg: TrainConfig, model_path: str, trained: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    dtype = next(model.parameters()).dtype
    model = model.float()
    if cfg.method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(trained)).merge_and_unload()
    else:
        from safetensors.torch import load_file

        weights = load_file(str(trained / FULL_WEIGHTS_FILE))
        params = dict(model.named_parameters())
        missing = sorted(set(params) - set(weights))
        unknown = sorted(set(weights) - set(params))
        if missing or unknown:
            raise RuntimeError(
                f"trained weights do not fit the base model: missing {missing[:3]}, unknown {unknown[:3]}"
            )
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(torch.float32))
    model = model.to(dtype)
    model.config.use_cache = True
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(model_path).save_pretrained(str(out))


def _plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (target tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


def _publish(local: Path, fs: Any, dest: str) -> None:
    """Move a finished local folder to ``dest`` (replacing it): rename on disk, copy to a URI."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        target = Path(dest)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(local), str(target))
    else:
        fs.delete_dir_contents(dest, missing_dir_ok=True)
        pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def train_job(cfg: JobConfig, labels: str, output: str, resume: bool = False) -> dict[str, Any]:
    """Fine-tune ``cfg.sampling.model`` on a labels folder; export to ``output``. Returns a summary."""
    import pyarrow.fs as pafs
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from se_ray.models import resolve_model
    from se_ray.storage import filesystem, write_text_atomic

    tcfg = cfg.train
    check_train_config(tcfg)
    started = time.perf_counter()
    label_fs, label_dir, parts = _labels_folder(labels, cfg.storage)
    rows = _count_rows(label_fs, parts)
    plan = plan_steps(tcfg, rows, tcfg.num_workers)
    out_fs, out_path = filesystem(output, cfg.storage)
    storage_path = posixpath.join(out_path, "ray_train")
    run_path = posixpath.join(storage_path, RUN_NAME)
    prior_step = _restore_point(out_fs, run_path)
    if prior_step is not None:
        if not resume:
            raise FileExistsError(
                f"{output} already holds a training run ({run_path}): pass resume=True (--resume) "
                "to continue it, or choose another output"
            )
        logger.info("resuming the run in %s from its checkpoint at step %d", run_path, prior_step)
    elif resume:
        logger.info("nothing to resume in %s: starting a fresh run", run_path)
    out_fs.create_dir(out_path, recursive=True)
    logger.info(
        "train: %d labels rows from %s -> %d steps (%d epochs x %d), %s ZeRO-%d on %d workers",
        rows,
        label_dir,
        plan.total_steps,
        plan.epochs,
        plan.steps_per_epoch,
        tcfg.method,
        tcfg.zero_stage,
        tcfg.num_workers,
    )

    _ensure_ray(cfg)
    dataset = _read_labels(parts, label_fs)
    wanted = [c for c in (col.QUESTION, col.CONTEXT, col.TARGET) if c in dataset.columns()]
    if col.QUESTION not in wanted or col.TARGET not in wanted:
        raise ValueError(f"labels in {label_dir} lack the question/target columns (have {dataset.columns()})")
    dataset = dataset.select_columns(wanted)

    resources: dict[str, float] = {"CPU": tcfg.cpus_per_worker}
    if tcfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg.model_dump(mode="json"), "rows": rows},
        torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=out_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=tcfg.num_to_keep),
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
        ),
        datasets={"train": dataset},
    )
    fit_start = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - fit_start
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"the training run in {run_path} finished without a checkpoint")

    with tempfile.TemporaryDirectory(prefix="se-ray-export-") as tmp_name:
        tmp = Path(tmp_name)
        meta = tmp / "checkpoint"
        pafs.copy_files(
            posixpath.join(checkpoint.path, STATE_DIR),
            str(meta),
            source_filesystem=checkpoint.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        state = json.loads((meta / STATE_FILE).read_text())
        history = [json.loads(x) for x in (meta / METRICS_FILE).read_text().splitlines() if x.strip()]
        if state["step"] != plan.total_steps:
            raise RuntimeError(f"latest checkpoint is at step {state['step']}, expected {plan.total_steps}")
        trained = meta / EXPORT_DIR

        paths: dict[str, str | None] = {"adapter": None, "merged": None}
        model_path = resolve_model(cfg.sampling.model)
        if tcfg.method == "lora":
            adapter = tmp / "adapter"
            shutil.copytree(trained, adapter)
            _assert_no_pickles(adapter)
            paths["adapter"] = posixpath.join(output, "adapter")
            _publish(adapter, out_fs, posixpath.join(out_path, "adapter"))
        if tcfg.export_merged:
            merged = tmp / "merged"
            _export_merged(tcfg, model_path, trained, merged)
            _assert_no_pickles(merged)
            paths["merged"] = posixpath.join(output, "merged")
            _publish(merged, out_fs, posixpath.join(out_path, "merged"))

        done_before = prior_step or 0
        this_run = [h for h in history if h["step"] > done_before]
        timed = this_run or history
        tokens = sum(h["tokens"] for h in timed)
        busy = sum(h["step_s"] for h in timed)
        summary = {
            "summary": True,
            "final_loss": history[-1]["loss"] if history else None,
            "first_loss": history[0]["loss"] if history else None,
            "steps": plan.total_steps,
            "epochs": plan.epochs,
            "rows": rows,
            "resumed_from_step": prior_step,
            "start_step": this_run[0]["step"] if this_run else None,
            "steps_run": state["step"] - done_before,
            "tokens_per_s": tokens / busy if busy > 0 else None,
            "fit_s": fit_s,
            "wall_s": time.perf_counter() - started,
            "method": tcfg.method,
            "zero_stage": tcfg.zero_stage,
            "num_workers": tcfg.num_workers,
            "checkpoint": checkpoint.path,
            **paths,
        }
        lines = [json.dumps(h, sort_keys=True) for h in history] + [json.dumps(summary, sort_keys=True)]
        write_text_atomic(out_fs, posixpath.join(out_path, "metrics.jsonl"), "\n".join(lines) + "\n")
        write_text_atomic(out_fs, posixpath.join(out_path, "train_config.yaml"), cfg.to_yaml())
        if history:
            png = tmp / "loss.png"
            _plot_loss(history, png)
            with out_fs.open_output_stream(posixpath.join(out_path, "loss.png")) as f:
                f.write(png.read_bytes())

    for h in this_run:  # rank 0 logged these live; repeated here for driver-side logs
        logger.debug(
            "step %d/%d epoch %d loss %.4f lr %.3g tokens/s %.0f",
            h["step"],
            plan.total_steps,
            h["epoch"],
            h["loss"],
            h["lr"],
            h["tokens_per_s"],
        )
    logger.info(
        "train done: %d steps (%d run now), %d epochs, final loss %s, %.0f tokens/s, %.1f s wall; "
        "adapter=%s merged=%s",
        summary["steps"],
        summary["steps_run"],
        summary["epochs"],
        f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a",
        summary["tokens_per_s"] or 0.0,
        summary["wall_s"],
        paths["adapter"],
        paths["merged"],
    )
    return {k: v for k, v in summary.items() if k != "summary"}


__all__ = [
    "IGNORE_INDEX",
    "StepPlan",
    "TokenizeCollate",
    "check_train_config",
    "deepspeed_config",
    "lora_config",
    "pad_batch",
    "plan_steps",
    "tokenize_example",
    "train_job",
    "train_loop_per_worker",
    "warmup_cosine",
]
