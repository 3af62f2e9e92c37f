"""Stage 5: fine-tune on the labeled stream with Ray Train and DeepSpeed ZeRO.

``plan`` decides what a run will do (pure, tested without a cluster), ``examples`` turns label rows
into tokenised batches, ``worker`` is what every Ray Train worker runs, ``checkpoint`` is the layout
both sides read, ``job`` is the driver and ``export`` writes OUTPUT.

Importing this package loads no torch, ray, deepspeed or peft: every module imports them where used.
"""

from se_ray.train.examples import IGNORE_INDEX, TokenizeCollate, pad_batch, tokenize_example
from se_ray.train.job import train_job
from se_ray.train.plan import (
    StepPlan,
    check_train_config,
    deepspeed_config,
    lora_config,
    plan_steps,
    warmup_cosine,
)
from se_ray.train.worker import train_loop_per_worker

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
