"""The cluster-free pieces of se_ray.train: DeepSpeed/LoRA configs, step plan, LR schedule, masking."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from se_ray.config import ABSTENTION_TEXT, ConfigError, TrainConfig, load_config
from se_ray.train import (
    IGNORE_INDEX,
    TokenizeCollate,
    check_train_config,
    deepspeed_config,
    lora_config,
    pad_batch,
    plan_steps,
    tokenize_example,
    warmup_cosine,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from se_ray.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m-instruct"))


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


# --- tokenisation and masking ----------------------------------------------------------


def test_prompt_is_masked_and_target_plus_eos_is_learned(tokenizer):
    from se_ray.prompts import render_prompt

    question = "who wrote the declaration of independence"
    ex = tokenize_example(tokenizer, question, None, ABSTENTION_TEXT, "short", max_length=256)
    prompt_ids = tokenizer(render_prompt(tokenizer, question, "short"), add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(ABSTENTION_TEXT, add_special_tokens=False)["input_ids"]

    learned = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert len(learned) == len(target_ids) + 1  # the target's tokens and EOS
    assert learned == target_ids + [tokenizer.eos_token_id]
    assert ex["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)  # the prompt is all -100
    assert ex["input_ids"] == prompt_ids + target_ids + [tokenizer.eos_token_id]
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])
    assert len(ex["labels"]) == len(ex["input_ids"])


def test_context_goes_into_the_masked_prompt(tokenizer):
    with_ctx = tokenize_example(tokenizer, "q?", "some passage", "Paris", "sentence", max_length=256)
    without = tokenize_example(tokenizer, "q?", None, "Paris", "sentence", max_length=256)
    assert len(with_ctx["input_ids"]) > len(without["input_ids"])
    n_target = len(tokenizer("Paris", add_special_tokens=False)["input_ids"]) + 1
    for ex in (with_ctx, without):
        assert sum(t != IGNORE_INDEX for t in ex["labels"]) == n_target


def test_long_prompts_are_cut_from_the_left_keeping_the_target(tokenizer):
    long_question = "why " * 300
    ex = tokenize_example(tokenizer, long_question, None, ABSTENTION_TEXT, "short", max_length=64)
    target_ids = tokenizer(ABSTENTION_TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(ex["input_ids"]) == 64
    assert ex["input_ids"][-len(target_ids) :] == target_ids
    assert [t for t in ex["labels"] if t != IGNORE_INDEX] == target_ids
    # the end of the prompt (the assistant header) survives the cut
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][64 - len(target_ids) - len(header) : 64 - len(target_ids)] == header


def test_pad_batch_right_pads_with_ignored_labels():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
        {"input_ids": [8], "labels": [8], "attention_mask": [1]},
    ]
    out = pad_batch(examples, pad_token_id=0)
    assert out["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(out["input_ids"], [[5, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(out["labels"], [[-100, 6, 7], [8, -100, -100]])
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1], [1, 0, 0]])
    with pytest.raises(ValueError):
        pad_batch([], pad_token_id=0)


def test_collate_tokenises_a_stream_batch(tokenizer):
    collate = TokenizeCollate(tokenizer, "short", max_length=128)
    batch = {
        "question": np.array(["what is the capital of france", "who is the king"], dtype=object),
        "context": np.array([None, ""], dtype=object),
        "target": np.array(["Paris.", ABSTENTION_TEXT], dtype=object),
    }
    out = collate(batch)
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape
    assert out["input_ids"].shape[0] == 2
    n_learned = (out["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    expected = [
        len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in ("Paris.", ABSTENTION_TEXT)
    ]
    assert n_learned == expected
    with pytest.raises(KeyError, match="target"):
        collate({"question": batch["question"]})


def test_collate_rejects_an_empty_target(tokenizer):
    collate = TokenizeCollate(tokenizer, "short", max_length=128)
    with pytest.raises(ValueError, match="empty target"):
        collate({"question": np.array(["q"], dtype=object), "target": np.array([None], dtype=object)})


# --- labels folder ---------------------------------------------------------------------


def test_labels_folder_skips_temporary_parts_and_accepts_the_run_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from se_ray.train import _count_rows, _labels_folder

    labels = tmp_path / "run" / "labels"
    labels.mkdir(parents=True)
    table = pa.table({"id": ["a", "b"], "question": ["q1", "q2"], "target": ["x", "y"]})
    pq.write_table(table, labels / "part-00000.parquet")
    (labels / "_part-00001.parquet").write_text("half written")
    (labels / ".part-00002.parquet.tmp").write_text("half written")
    for given in (labels, tmp_path / "run"):
        fs, folder, parts = _labels_folder(str(given), None)
        assert folder == str(labels)
        assert [p.rsplit("/", 1)[-1] for p in parts] == ["part-00000.parquet"]
        assert _count_rows(fs, parts) == 2
    with pytest.raises(FileNotFoundError, match="no committed labels"):
        _labels_folder(str(tmp_path), None)


# --- import hygiene --------------------------------------------------------------------


def test_importing_train_loads_no_heavy_packages():
    code = (
        "import sys, se_ray.train, se_ray.config;"
        "heavy = ('torch', 'ray', 'deepspeed', 'peft', 'transformers', 'vllm');"
        "heavy = [m for m in heavy if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_defaults_give_a_sane_plan():
    cfg = TrainConfig()
    plan = plan_steps(cfg, rows=2000, world_size=cfg.num_workers)
    assert plan.grad_accum == 6
    assert plan.steps_per_epoch == math.ceil(math.ceil(1000 / 4) / 6)
    assert plan.total_steps == 7 * plan.steps_per_epoch
