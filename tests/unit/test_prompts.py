"""Every prompt se-ray sends, against the reference code's text."""

from se_ray.prompts import SYSTEM_PROMPTS, correctness_prompt, entailment_prompt, question_messages


def test_judge_prompt_single_reference_is_the_reference_text():
    prompt = correctness_prompt("who wrote hamlet", "Shakespeare", ["William Shakespeare"])
    assert prompt == (
        "We are assessing the quality of answers to the following question: who wrote hamlet\n"
        "The expected answer is: William Shakespeare.\n"
        "The proposed answer is: Shakespeare\n"
        "Within the context of the question, does the proposed answer mean the same as the expected answer?"
        " Respond only with yes or no.\nResponse:"
    )


def test_judge_prompt_multi_reference_variant():
    prompt = correctness_prompt(
        "where is the sound of music set", "Salzburg", ["Salzburg, Austria", "Austria"]
    )
    assert (
        "The following are expected answers to this question: ['Salzburg, Austria', 'Austria'].\n" in prompt
    )
    assert "mean the same as any of the expected answers? Respond only with yes or no.\nResponse:" in prompt


def test_entailment_prompt_is_the_reference_prompt():
    prompt = entailment_prompt("who wrote hamlet", "Shakespeare", "Marlowe")
    assert prompt.startswith('We are evaluating answers to the question "who wrote hamlet"\n')
    assert "Possible Answer 1: Shakespeare\nPossible Answer 2: Marlowe\n" in prompt
    assert prompt.endswith("Respond only with entailment, contradiction, or neutral.\nResponse:")


def test_answer_styles_are_the_papers():
    short = question_messages("q?", "short")
    assert short == [
        {"role": "system", "content": SYSTEM_PROMPTS["short"]},
        {"role": "user", "content": "q?"},
    ]
    assert "single brief but complete sentence" in SYSTEM_PROMPTS["sentence"]
    assert question_messages("q?", "short", "ctx")[1]["content"] == "Context: ctx\nQuestion: q?"
