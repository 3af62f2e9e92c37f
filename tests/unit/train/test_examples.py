"""se_ray.train.examples: prompt masking, truncation, padding and the streaming collate."""

from __future__ import annotations

import numpy as np
import pytest

from se_ray.config import ABSTENTION_TEXT
from se_ray.train.examples import IGNORE_INDEX, TokenizeCollate, pad_batch, tokenize_example, with_last


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from se_ray.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m-instruct"))


def test_prompt_is_masked_and_target_plus_eos_is_learned(tokenizer):
    from se_ray.prompts import question_messages

    question = "who wrote the declaration of independence"
    ex = tokenize_example(tokenizer, question, None, ABSTENTION_TEXT, "short", max_length=256)
    messages = question_messages(question, "short")
    prompt_ids = list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    )  # Hugging Face's own chat tokenisation (SmolLM2 adds no BOS of its own)
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


def test_with_last_flags_only_the_final_item():
    assert list(with_last(iter([1, 2, 3]))) == [(1, False), (2, False), (3, True)]
    assert list(with_last(iter(["only"]))) == [("only", True)]
    assert list(with_last(iter([]))) == []
