"""Every prompt se-ray sends: the paper's two answer styles (sampling, training, evaluation), the
reference LLM entailment prompt and the reference correctness-judge prompt, and the one renderer
that turns a chat into the token ids every model sees (``chat_prompt_ids``)."""

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


def with_one_bos(ids: Sequence[int], bos_id: int | None, adds_bos: bool) -> list[int]:
    """``ids`` starting with exactly one ``bos_id``: repeats at the start collapse to one, and one
    is put first where the tokenizer would add it and the template did not. Without a BOS token,
    or for a tokenizer that adds none to a template that writes none, ``ids`` are unchanged."""
    out = list(ids)
    if bos_id is None:
        return out
    while len(out) > 1 and out[0] == bos_id and out[1] == bos_id:
        del out[0]
    if adds_bos and (not out or out[0] != bos_id):
        out.insert(0, bos_id)
    return out


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether encoding with special tokens puts the BOS token first (Llama-3's post-processor,
    ``add_bos_token``), found by encoding a probe text both ways."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(special) and special[0] == bos and (not plain or plain[0] != bos)


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of a chat prompt, ending where the assistant's answer starts: the one
    tokenisation every model call uses (vLLM engines, training examples, the selection probe).

    The chat template is rendered to text (``add_generation_prompt=True``) and encoded without
    special tokens, so a BOS the template writes (Llama-3's ``<|begin_of_text|>``) is kept once
    and not doubled; where only the tokenizer adds one, it is added once (``with_one_bos``).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return with_one_bos(ids, tokenizer.bos_token_id, tokenizer_adds_bos(tokenizer))


def question_prompt_ids(
    tokenizer: Any, question: str, style: AnswerStyle, context: str | None = None
) -> list[int]:
    """``chat_prompt_ids`` of a question in the paper's answer style (sampling, training, evaluation)."""
    return chat_prompt_ids(tokenizer, question_messages(question, style, context))


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
