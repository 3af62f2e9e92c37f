"""se_ray.train.plan: config checks, DeepSpeed/LoRA configs, step plan and LR schedule."""

from __future__ import annotations

import json
import math

import pytest

from se_ray.config import ConfigError, TrainConfig, load_config
from se_ray.train.plan import check_train_config, deepspeed_config, lora_config, plan_steps, warmup_cosine

# --- DeepSpeed config ------------------------------------------------------------------


def test_deepspeed_config_batch_math_and_cpu_precision():
    cfg = TrainConfig(global_batch_size=48, micro_batch_size=4, zero_stage=2)
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 6  # 48 // (4 * 2)
    assert ds["train_batch_size"] == 48 == 4 * 6 * 2
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False  # CPU trains in fp32
    assert ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 1.0
    # warm-up + cosine run as the client scheduler: nothing of the kind inside the DS config
    assert "optimizer" not in ds and "scheduler" not in ds
    json.dumps(ds)  # plain JSON, as deepspeed.initialize wants it


def test_deepspeed_config_gpu_zero3():
    cfg = TrainConfig(
        use_gpu=True, zero_stage=3, global_batch_size=16, micro_batch_size=2, gradient_clipping=0.5
    )
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize(("world", "accum"), [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)])
def test_deepspeed_config_accumulation_follows_world_size(world, accum):
    ds = deepspeed_config(TrainConfig(global_batch_size=48, micro_batch_size=4), world_size=world)
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["train_micro_batch_size_per_gpu"] * accum * world == 48


def test_bad_batch_combination_errors_clearly():
    cfg = TrainConfig(global_batch_size=48, micro_batch_size=4)
    with pytest.raises(ConfigError, match=r"global_batch_size=48 is not a multiple of .*4\*5=20"):
        deepspeed_config(cfg, world_size=5)
    # the job config catches it for its own num_workers at load time
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config(None, ["train.global_batch_size=10", "train.micro_batch_size=4", "train.num_workers=2"])


def test_full_finetuning_without_merged_export_is_rejected():
    with pytest.raises(ConfigError, match=r"method=full .*export_merged=false"):
        check_train_config(TrainConfig(method="full", export_merged=False))
    check_train_config(TrainConfig(method="lora", export_merged=False))  # the adapter is still exported


def test_lora_without_targets_is_rejected():
    with pytest.raises(ConfigError, match="lora_target_modules"):
        check_train_config(TrainConfig(lora_target_modules=[]))


def test_a_world_of_no_workers_is_rejected():
    with pytest.raises(ConfigError, match="world_size=0"):
        check_train_config(TrainConfig(), world_size=0)


# --- LoRA ------------------------------------------------------------------------------


def test_lora_config_is_the_papers_by_default():
    lc = lora_config(TrainConfig())
    assert lc.r == 8
    assert set(lc.target_modules) == {"q_proj", "v_proj"}
    assert lc.lora_alpha == 16
    assert lc.lora_dropout == pytest.approx(0.05)
    assert str(lc.task_type.value if hasattr(lc.task_type, "value") else lc.task_type) == "CAUSAL_LM"
    assert lc.bias == "none"


def test_lora_config_follows_the_config():
    lc = lora_config(
        TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "o_proj"])
    )
    assert (lc.r, lc.lora_alpha, lc.lora_dropout) == (4, 8, 0.0)
    assert set(lc.target_modules) == {"q_proj", "o_proj"}


def test_lora_config_for_full_finetuning_is_an_error():
    with pytest.raises(ConfigError, match="method=full has no LoRA config"):
        lora_config(TrainConfig(method="full"))


# --- step plan and LR schedule ---------------------------------------------------------


def test_plan_steps_counts_micro_batches_windows_and_steps():
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=2, epochs=3, warmup_ratio=0.2)
    plan = plan_steps(cfg, rows=11, world_size=2)
    assert plan.rows_per_worker == 5  # streaming_split(equal=True) drops the 11th row
    assert plan.micro_batches_per_epoch == 3  # 2 + 2 + 1 rows
    assert plan.grad_accum == 2
    assert plan.steps_per_epoch == 2  # one full window, one short window of 1 micro-batch
    assert [plan.window_size(i) for i in range(3)] == [2, 2, 1]
    assert plan.total_steps == 6
    assert plan.warmup_steps == 1  # round(0.2 * 6)


def test_plan_steps_needs_a_row_per_worker():
    with pytest.raises(ConfigError, match="too few"):
        plan_steps(TrainConfig(global_batch_size=4, micro_batch_size=2), rows=1, world_size=2)


def test_defaults_give_a_sane_plan():
    cfg = TrainConfig()
    plan = plan_steps(cfg, rows=2000, world_size=cfg.num_workers)
    assert plan.grad_accum == 6
    assert plan.steps_per_epoch == math.ceil(math.ceil(1000 / 4) / 6)
    assert plan.total_steps == 7 * plan.steps_per_epoch


def test_warmup_then_cosine():
    total, warmup = 20, 4
    lrs = [warmup_cosine(s, total, warmup) for s in range(total)]
    assert lrs[:warmup] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up, never 0
    assert lrs[warmup] == pytest.approx(1.0)
    after = lrs[warmup:]
    assert all(a > b for a, b in zip(after, after[1:], strict=False))  # cosine decay
    assert warmup_cosine(warmup + (total - warmup) // 2, total, warmup) == pytest.approx(0.5)
    assert 0 < lrs[-1] < 0.02  # ends just above 0
    assert warmup_cosine(0, 10, 0) == 1.0  # no warm-up
