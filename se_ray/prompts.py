"""The paper's two answer styles, as chat messages shared by sampling, training and evaluation."""

from __future__ import annotations

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
