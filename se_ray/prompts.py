"""Every prompt se-ray sends: the paper's two answer styles (sampling, training, evaluation), the
reference LLM entailment prompt and the reference correctness-judge prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

AnswerStyle = Literal["short", "sentence"]

SYSTEM_PROMPTS: dict[str, str] = {
    "short": "Answer the following question as briefly as possible.",
    "sentence": "Answer the following question in a single brief but complete sentence.",
}


def question_messages(question: str, style: AnswerStyle, context: str | None = None) -> list[dict[str, str]]:
    user = f"Context: {context}\nQuestion: {question}" if context else question
    return [{"role": "system", "content": SYSTEM_PROMPTS[style]}, {"role": "user", "content": user}]


def render_prompt(tokenizer: Any, question: str, style: AnswerStyle, context: str | None = None) -> str:
    """The chat-templated prompt text, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(
        question_messages(question, style, context), tokenize=False, add_generation_prompt=True
    )


# jlko/semantic_uncertainty's LLM entailment prompt.
ENTAILMENT_PROMPT = (
    'We are evaluating answers to the question "{question}"\n'
    "Here are two possible answers:\n"
    "Possible Answer 1: {text1}\n"
    "Possible Answer 2: {text2}\n"
    "Does Possible Answer 1 semantically entail Possible Answer 2? "
    "Respond only with entailment, contradiction, or neutral.\n"
    "Response:"
)


def entailment_prompt(question: str, premise: str, hypothesis: str) -> str:
    return ENTAILMENT_PROMPT.format(question=question, text1=premise, text2=hypothesis)


def correctness_prompt(question: str, answer: str, references: Sequence[str]) -> str:
    """The reference code's LLM-judge prompt (jlko/semantic_uncertainty ``model_based_metric``),
    with its multi-reference variant when a question has several gold answers."""
    refs = list(references)
    prompt = f"We are assessing the quality of answers to the following question: {question}\n"
    if len(refs) == 1:
        prompt += f"The expected answer is: {refs[0]}.\n"
    else:
        prompt += f"The following are expected answers to this question: {refs}.\n"
    prompt += f"The proposed answer is: {answer}\n"
    which = "the expected answer" if len(refs) == 1 else "any of the expected answers"
    prompt += f"Within the context of the question, does the proposed answer mean the same as {which}?"
    return prompt + " Respond only with yes or no.\nResponse:"
