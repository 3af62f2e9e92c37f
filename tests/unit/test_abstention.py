"""Tests for se_ray.abstention: the one rule clustering, evaluation, the probe and the report use."""

from __future__ import annotations

import pytest

from se_ray.abstention import (
    ABSTENTION_PHRASES,
    DEFAULT_ABSTENTION_TEXT,
    NONEXISTENCE_PHRASES,
    is_abstention,
    normalised_tokens,
)
from se_ray.answers.residual import analyse
from se_ray.metrics import score_answers

# The phrases as a model writes them: each must abstain on its own, at the start of an answer.
WRITTEN = {
    ("i", "dont", "know"): "I don't know.",
    ("i", "do", "not", "know"): "I do not know.",
    ("i", "am", "not", "sure"): "I am not sure.",
    ("im", "not", "sure"): "I'm not sure.",
    ("not", "sure"): "Not sure.",
    ("i", "am", "not", "certain"): "I am not certain.",
    ("im", "not", "certain"): "I’m not certain.",
    ("no", "idea"): "No idea.",
    ("i", "have", "no", "idea"): "I have no idea.",
    ("i", "cannot", "answer"): "I cannot answer that question.",
    ("i", "cant", "answer"): "I can't answer that.",
    ("i", "cannot", "say"): "I cannot say.",
    ("i", "cant", "say"): "I can't say for sure.",
    ("i", "am", "unable"): "I am unable to answer.",
    ("im", "unable"): "I'm unable to find that.",
    ("i", "dont", "have"): "I don't have information about Pondovia.",
    ("i", "do", "not", "have"): "I do not have enough data.",
    ("no", "information"): "No information is available.",
    ("not", "enough", "information"): "Not enough information.",
    ("there", "is", "no"): "There is no capital of Pondovia.",
    ("there", "isnt"): "There isn't a country called Pondovia.",
    ("there", "are", "no"): "There are no records of it.",
}


def test_every_phrase_has_a_written_case() -> None:
    assert set(WRITTEN) == set(ABSTENTION_PHRASES)


@pytest.mark.parametrize("phrase", ABSTENTION_PHRASES, ids=" ".join)
def test_each_phrase_abstains_at_the_start(phrase: tuple[str, ...]) -> None:
    text = WRITTEN[phrase]
    assert tuple(normalised_tokens(text)[: len(phrase)]) == phrase
    assert is_abstention(text)
    assert is_abstention(text.upper())
    assert is_abstention("Sorry, " + text)
    assert is_abstention("I'm sorry, but " + text[0].lower() + text[1:])


@pytest.mark.parametrize("phrase", ABSTENTION_PHRASES, ids=" ".join)
def test_each_phrase_mid_answer_is_an_answer(phrase: tuple[str, ...]) -> None:
    # Anchored at the start: a phrase after a claim does not turn the claim into an abstention.
    assert not is_abstention("The capital of France is Paris, " + " ".join(phrase) + ".")


@pytest.mark.parametrize("phrase", ABSTENTION_PHRASES, ids=" ".join)
def test_each_phrase_then_a_commitment_is_an_answer(phrase: tuple[str, ...]) -> None:
    assert not is_abstention(WRITTEN[phrase] + " But I think it is Paris.")
    assert not is_abstention(WRITTEN[phrase].rstrip(".") + ", maybe Lyon.")


@pytest.mark.parametrize("phrase", NONEXISTENCE_PHRASES, ids=" ".join)
def test_nonexistence_may_follow_the_name(phrase: tuple[str, ...]) -> None:
    written = {"does": "does not", "doesnt": "doesn't", "do": "do not", "dont": "don't"}[phrase[0]]
    assert is_abstention(f"Pondovia {written} exist.")
    assert is_abstention(f"The country of Pondovia {written} exist, so it has no capital.")
    # Only in the first sentence.
    assert not is_abstention(f"The capital is Kiro. Its old palace {written} exist any more.")
    assert not is_abstention(f"Pondovia {written} exist, but its capital would be Kiro.")


@pytest.mark.parametrize(
    "answer",
    [
        DEFAULT_ABSTENTION_TEXT,
        "I don't know the answer",
        "i don't know the answer.",
        "I DON'T KNOW THE ANSWER!",
        "  I   don't know   the answer .  ",
        "I dont know.",
        "I don’t know",  # typographic apostrophe
        "I don't know the answer. Sorry.",
        "I do not know the answer to that question.",
        '"I don\'t know the answer."',
        "Unknown.",
        "unknown",
        "Unfortunately, I don't know.",
        "To be honest, I have no idea.",
        "I don't know what the capital of Pondovia is.",
        "I'm not sure.\nPondovia does not exist.",
        "I don't know the answer; there is no such country.",
        "There is no capital of Pondovia because Pondovia does not exist.",
    ],
)
def test_abstentions(answer: str) -> None:
    assert is_abstention(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "   ",
        "...",
        "Paris",
        "Sorry.",
        "Sorry, but Paris.",
        "Nobody knows who wrote it.",
        "I know it is Paris.",
        "The answer is: I don't know",
        "It is unknown.",
        "Unknown to most, the capital is Kiro.",
        "I do know: it is Paris.",
        "I don't knowingly support that.",
        "I don't know exactly, but it was 1066.",
        "I don't know for sure; I think it is Paris.",
        "I do not know, probably Lyon.",
        "I'm not sure, it could be Lyon.",
        "I am not sure. It might be 3.5 million.",
        "I don't know why the sky is blue? Because of Rayleigh scattering.",
        "I don't know why. Because it is cold.",
        "The capital of France is Paris, there is no doubt.",
        "Not only Paris but also Lyon.",
        "Notably, Paris.",
    ],
)
def test_answers(answer: str) -> None:
    assert not is_abstention(answer)


def test_decimal_point_is_not_a_sentence_break() -> None:
    # "3.5" stays one sentence, so the commitment after it is seen in the same clause.
    assert not is_abstention("I don't know 3.5 but maybe 4.")
    assert is_abstention("I don't know 3.5 million people.")


def test_configured_text_is_one_more_opening_phrase() -> None:
    text = "I cannot provide that."
    assert is_abstention("I cannot provide that", abstention_text=text)
    assert is_abstention("i CANNOT provide that!! Sorry", abstention_text=text)
    assert is_abstention("I don't know", abstention_text=text)  # the built-in phrases still count
    assert not is_abstention("I can provide that: Paris", abstention_text=text)
    # A text that normalises to nothing must not turn every answer into an abstention.
    assert not is_abstention("Paris", abstention_text="...")
    assert not is_abstention("Paris", abstention_text="")


def test_normalised_tokens() -> None:
    assert normalised_tokens("I’m sorry, but the answer isn't known!") == [
        "im",
        "sorry",
        "but",
        "answer",
        "isnt",
        "known",
    ]


@pytest.mark.parametrize(
    "answer",
    ["I'm not sure.", "I don't know.", "No idea.", "Paris", "I don't know exactly, but it was 1066."],
)
def test_clustering_and_evaluation_agree(answer: str) -> None:
    # The example: "I'm not sure." was an abstention when clustering, wrong when evaluating.
    question = "When did the Battle of Hastings take place?"
    abstained = is_abstention(answer)
    assert analyse(question, answer).abstains == abstained
    assert score_answers([abstained], [False]).abstained == int(abstained)
