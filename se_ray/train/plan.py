"""What a training run will do, decided before any model loads: config checks, DeepSpeed and LoRA
configs, the step plan and the LR schedule. No torch at import; every worker computes the same."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from se_ray.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from peft import LoraConfig


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

    Optimizer and LR schedule are not in it: the worker builds them and hands them to
    ``deepspeed.initialize``, so that the schedule knows the real number of optimizer steps.
    """
    check_train_config(cfg, world_size)
    grad_accum = cfg.global_batch_size // (cfg.micro_batch_size * world_size)
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": cfg.use_gpu,
    }
    if cfg.zero_stage == 3:
        # The export gathers the trainable weights itself (GatheredParameters), so DeepSpeed's own
        # 16-bit consolidation on save would only cost time.
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


def lora_config(cfg: TrainConfig) -> LoraConfig:
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
    """The step plan of ``rows`` labels rows on ``world_size`` workers."""
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

    Never 0 on a step that runs, so no step is wasted: warm-up starts at 1/warmup_steps and
    the cosine ends one step short of 0.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
