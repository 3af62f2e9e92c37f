"""se_ray.train.selection: which step to export, and the greedy probe it is chosen by."""

from __future__ import annotations

import pytest

from se_ray.train.selection import SelectionPlan, closest_step, improves, probe_steps
from tests.conftest import greedy_one_prompt_at_a_time

MODEL = "builtin:smollm2-135m-instruct"


def test_closest_step_takes_the_rate_nearest_the_labels():
    probes = [(5, 0.10), (10, 0.30), (15, 0.55), (20, 0.70)]
    assert closest_step(probes, 0.45) == 15  # |0.55 - 0.45| = 0.10 < |0.30 - 0.45| = 0.15
    assert closest_step(probes, 0.35) == 10
    assert closest_step(probes, 0.0) == 5
    assert closest_step(probes, 1.0) == 20
    assert closest_step([], 0.5) is None


def test_ties_go_to_the_later_step_whatever_the_order():
    assert closest_step([(5, 0.25), (10, 0.75)], 0.5) == 10
    assert closest_step([(10, 0.75), (5, 0.25)], 0.5) == 10
    assert closest_step([(4, 0.5), (8, 0.5), (12, 0.5)], 0.5) == 12


def test_improves_is_the_incremental_form_of_closest_step():
    assert improves(0.9, None, 0.5)
    assert improves(0.6, 0.7, 0.5) and improves(0.4, 0.6, 0.5)  # equal distance: the later wins
    assert not improves(0.8, 0.6, 0.5)
    rates = [0.0, 0.2, 0.65, 0.35, 0.9, 0.4]
    best = None
    for step, rate in enumerate(rates, 1):
        if improves(rate, None if best is None else rates[best - 1], 0.42):
            best = step
    assert best == closest_step(list(enumerate(rates, 1)), 0.42) == 6


@pytest.mark.parametrize(
    ("every", "per_epoch", "total", "expected"),
    [
        (None, 20, 40, [20, 40]),
        (5, 20, 40, [5, 10, 15, 20, 25, 30, 35, 40]),
        (6, 10, 30, [6, 10, 12, 18, 20, 24, 30]),
        (50, 10, 20, [10, 20]),
        (1, 2, 3, [1, 2, 3]),  # a short last epoch ends the run off the epoch grid
        (None, 4, 6, [4, 6]),
    ],
)
def test_probe_steps_are_every_n_and_each_epoch_end(every, per_epoch, total, expected):
    assert probe_steps(every, per_epoch, total) == expected


def test_selection_plan_survives_the_train_loop_config():
    plan = SelectionPlan([("Capital of France?", None), ("Who wrote it?", "A book.")], 0.45, "I don't know.")
    assert SelectionPlan.from_dict(plan.to_dict()) == plan


@pytest.fixture(scope="module")
def model_and_tokenizer():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from se_ray.models import resolve_model

    torch.set_num_threads(1)
    path = resolve_model(MODEL)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(
        path
    )


def test_batched_greedy_answers_match_one_prompt_at_a_time(model_and_tokenizer):
    """Left padding must not change an answer: positions count from each prompt's first token."""
    from se_ray.prompts import question_prompt_ids
    from se_ray.train.selection import greedy_answers

    model, tokenizer = model_and_tokenizer
    questions = ["What is the capital of France?", "In which country is the city of Lyon?", "2+2?"]
    ids = [question_prompt_ids(tokenizer, q, "short") for q in questions]
    assert len({len(i) for i in ids}) == 3  # padding is exercised
    model.train()  # the probe runs mid-training: dropout must be off while it decodes, then back on
    batched = greedy_answers(model, tokenizer, ids, max_new_tokens=8)
    assert model.training
    model.eval()
    texts = [tokenizer.decode(i) for i in ids]
    assert batched == greedy_one_prompt_at_a_time(model, tokenizer, texts, max_new_tokens=8)
    assert "Paris" in batched[0]


def test_probe_counts_abstentions_by_the_evaluation_rule(model_and_tokenizer):
    from se_ray.prompts import question_prompt_ids
    from se_ray.train.selection import probe_abstention_rate

    model, tokenizer = model_and_tokenizer
    # Asked to say it, the model abstains; asked a fact, it answers.
    say = question_prompt_ids(tokenizer, "Repeat exactly: I don't know the answer.", "short")
    fact = question_prompt_ids(tokenizer, "What is the capital of France?", "short")
    rate = probe_abstention_rate(model, tokenizer, [say, fact], "I don't know the answer.", rank=0, world=1)
    assert rate == 0.5
    # Each rank takes every world-th prompt; alone (no process group) a rank counts only its slice.
    assert probe_abstention_rate(model, tokenizer, [say, fact], "I don't know.", rank=1, world=2) == 0.0
    assert probe_abstention_rate(model, tokenizer, [say, fact], "I don't know.", rank=0, world=2) == 1.0
