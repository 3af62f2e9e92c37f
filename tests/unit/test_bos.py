"""Exactly one BOS reaches the model on every prompt path (issue 16, defect 4).

SmolLM2 has no sequence-start token of its own (its "BOS" is ``<|im_start|>``, which opens every
turn), so these tests build, offline from its own files, variants that have one, as Llama-3 does
with ``<|begin_of_text|>``: ``<|endoftext|>`` (id 0) put first by the chat template, by the
tokenizer's post-processor, or by both (Llama-3's case, where text prompts used to get two).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from se_ray.config import ABSTENTION_TEXT
from se_ray.models import resolve_model
from se_ray.prompts import (
    chat_prompt_ids,
    question_messages,
    question_prompt_ids,
    tokenizer_adds_bos,
    with_one_bos,
)

MODEL = "builtin:smollm2-135m-instruct"
BOS = "<|endoftext|>"
BOS_ID = 0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
KINDS = ("template+tokenizer", "template", "tokenizer")


def write_bos_tokenizer(folder: Path, kind: str = "template+tokenizer") -> Path:
    """SmolLM2's tokenizer files in ``folder``, with ``<|endoftext|>`` as a BOS that the chat
    template writes (``template``), the tokenizer adds (``tokenizer``), or both (Llama-3)."""
    src = Path(resolve_model(MODEL))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    if "tokenizer" in kind:
        first = {"SpecialToken": {"id": BOS, "type_id": 0}}
        tokenizer["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                first,
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [BOS_ID], "tokens": [BOS]}},
        }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((src / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": BOS}))
    template = (src / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(("{{ bos_token }}" if "template" in kind else "") + template)
    return folder


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("bos")
    out = {kind: AutoTokenizer.from_pretrained(write_bos_tokenizer(root / kind, kind)) for kind in KINDS}
    out["smollm2"] = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    yield out
    shutil.rmtree(root, ignore_errors=True)


def assert_one_bos_first(ids) -> None:
    ids = list(ids)
    assert ids[:1] == [BOS_ID] and ids.count(BOS_ID) == 1, ids[:6]


# --- the pure rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "adds", "expected"),
    [
        ([7, 8], False, [7, 8]),  # no BOS anywhere: unchanged
        ([7, 8], True, [0, 7, 8]),  # the tokenizer would add one, the template wrote none
        ([0, 7, 8], False, [0, 7, 8]),  # the template wrote one
        ([0, 7, 8], True, [0, 7, 8]),  # both: still one
        ([0, 0, 7], True, [0, 7]),  # a doubled BOS collapses
        ([0, 0, 0, 7], False, [0, 7]),
        ([7, 0, 8], False, [7, 0, 8]),  # a BOS id later on is not the start's
        ([7, 0, 8], True, [0, 7, 0, 8]),
        ([], True, [0]),
        ([], False, []),
        ([0], True, [0]),
    ],
)
def test_with_one_bos(ids, adds, expected):
    assert with_one_bos(ids, BOS_ID, adds) == expected


def test_with_one_bos_without_a_bos_token_changes_nothing():
    assert with_one_bos([0, 0, 5], None, True) == [0, 0, 5]


# --- the variants really add a BOS, and the old text path doubled it -----------------------------


def test_the_variants_add_a_bos_where_they_say(tokenizers):
    assert [tokenizer_adds_bos(tokenizers[k]) for k in (*KINDS, "smollm2")] == [True, False, True, False]
    messages = question_messages("What is the capital of France?", "short")
    text = tokenizers["template+tokenizer"].apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    # What vLLM did with a text prompt (it encodes with special tokens): two BOS.
    assert tokenizers["template+tokenizer"](text)["input_ids"][:2] == [BOS_ID, BOS_ID]


# --- every path ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_renderer_puts_exactly_one_bos_first(tokenizers, kind):
    tokenizer = tokenizers[kind]
    for context in (None, "A passage."):
        ids = question_prompt_ids(tokenizer, "What is the capital of France?", "sentence", context)
        assert_one_bos_first(ids)
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Does A entail B?"}])  # the judges' chats
    assert_one_bos_first(ids)
    # The rest is the template's text, encoded once, without special tokens.
    plain = tokenizers["smollm2"]
    assert ids[1:] == chat_prompt_ids(plain, [{"role": "user", "content": "Does A entail B?"}])


def test_the_renderer_is_hugging_faces_chat_tokenisation_for_smollm2(tokenizers):
    tokenizer = tokenizers["smollm2"]
    messages = question_messages("Who wrote Hamlet?", "short", "Some context.")
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert chat_prompt_ids(tokenizer, messages) == list(expected)
    assert BOS_ID not in expected


@pytest.mark.parametrize("kind", KINDS)
def test_training_examples_carry_one_bos(tokenizers, kind):
    from se_ray.train.examples import IGNORE_INDEX, TokenizeCollate, tokenize_example

    tokenizer = tokenizers[kind]
    ex = tokenize_example(tokenizer, "Who wrote Hamlet?", None, ABSTENTION_TEXT, "short", max_length=256)
    assert_one_bos_first(ex["input_ids"])
    assert ex["labels"][0] == IGNORE_INDEX
    # the very ids the engine gets, then the target
    assert ex["input_ids"][: ex["labels"].count(IGNORE_INDEX)] == question_prompt_ids(
        tokenizer, "Who wrote Hamlet?", "short"
    )
    cut = tokenize_example(tokenizer, "why " * 300, None, ABSTENTION_TEXT, "short", max_length=64)
    assert len(cut["input_ids"]) == 64
    assert_one_bos_first(cut["input_ids"])  # cut from the left, the BOS stays
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    target = len(tokenizer(ABSTENTION_TEXT, add_special_tokens=False)["input_ids"]) + 1
    assert cut["input_ids"][64 - target - len(header) : 64 - target] == header

    batch = TokenizeCollate(tokenizer, "short", max_length=128)(
        {"question": ["Who wrote Hamlet?", "2+2?"], "target": ["Shakespeare.", ABSTENTION_TEXT]}
    )
    for row in batch["input_ids"].tolist():  # right-padded: each row starts with its BOS
        assert_one_bos_first(row)


def test_prompt_end_keeps_only_a_sequence_start_bos():
    from se_ray.train.examples import prompt_end

    assert prompt_end([0, 5, 6, 7, 8], 3, 0) == [0, 7, 8]
    assert prompt_end([0, 5, 6, 7, 8], 5, 0) == [0, 5, 6, 7, 8]
    assert prompt_end([0, 5, 6, 7, 8], 9, 0) == [0, 5, 6, 7, 8]
    assert prompt_end([0, 5, 6, 7, 8], 0, 0) == []
    assert prompt_end([1, 5, 1, 7, 8], 3, 1) == [1, 7, 8]  # SmolLM2: <|im_start|> opens every turn
    assert prompt_end([5, 6, 7, 8], 2, 0) == [7, 8]
    assert prompt_end([0, 5, 6, 7, 8], 3, None) == [6, 7, 8]


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32)


def test_the_selection_probe_feeds_the_model_one_bos(tokenizers, model, tmp_path):
    """The probe's prompts as the training worker builds them, decoded by the probe; what the
    model's first forward receives is read with a forward hook."""
    from se_ray.config import JobConfig
    from se_ray.train.plan import plan_steps
    from se_ray.train.selection import SelectionPlan, probe_abstention_rate
    from se_ray.train.weights import LoadedModel
    from se_ray.train.worker import Worker, _with_selection

    tokenizer = tokenizers["template+tokenizer"]
    job = JobConfig()
    plan = plan_steps(job.train, rows=8, world_size=1)
    questions = [("What is the capital of France?", None), ("Who wrote it?", "A long passage about a book.")]
    config = {"selection": SelectionPlan(questions, 0.5, ABSTENTION_TEXT).to_dict(), "output": str(tmp_path)}
    bare = Worker(job.train, plan, 0, 1, None, LoadedModel(None, tokenizer, None, None))
    worker = _with_selection(bare, job, config)
    assert len(worker.selection_prompts) == 2
    for ids in worker.selection_prompts:
        assert_one_bos_first(ids)

    seen = []
    hook = model.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append((kwargs["input_ids"], kwargs["attention_mask"])),
        with_kwargs=True,
    )
    try:
        probe_abstention_rate(model, tokenizer, worker.selection_prompts, ABSTENTION_TEXT, rank=0, world=1)
    finally:
        hook.remove()
    input_ids, mask = seen[0]  # the prefill: left-padded prompts
    for row, attended in zip(input_ids.tolist(), mask.tolist(), strict=True):
        assert_one_bos_first([t for t, m in zip(row, attended, strict=True) if m])


def test_teacher_forced_steps_read_each_continuation_token_after_what_precedes_it():
    from se_ray.engine_actor import teacher_forced_steps

    assert teacher_forced_steps([0, 5, 6], [7, 8, 7]) == [
        ([0, 5, 6], 7),
        ([0, 5, 6, 7], 8),
        ([0, 5, 6, 7, 8], 7),
    ]
    assert teacher_forced_steps([0, 5], [9]) == [([0, 5], 9)]
    assert teacher_forced_steps([0, 5], []) == []
