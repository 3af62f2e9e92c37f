"""The model-free answer analysis: residuals, numbers, abstentions, candidates and implications."""

from __future__ import annotations

import subprocess
import sys

import pytest

from se_ray.answers import residual as am
from se_ray.judges.entailment import CONTRADICTION, ENTAILMENT, NEUTRAL

CHINA = "What is the capital of China?"
FRANCE = "What is the capital of France?"
DENVILLE = "In which country is the city of Denville?"
POPULATION = "What is the population of Auckland?"
TEMPERATURE = "At what temperature are Celsius and Fahrenheit equal?"


def both(question: str, a: str, b: str, **kw) -> tuple[int, int]:
    return am.implication(question, a, b, **kw), am.implication(question, b, a, **kw)


# ---------------------------------------------------------------------------- residual


@pytest.mark.parametrize(
    ("question", "answer", "expected"),
    [
        (FRANCE, "Paris", "paris"),
        (FRANCE, "The capital of France is Paris.", "paris"),
        (FRANCE, "Paris is the capital city of France.", "paris"),
        (FRANCE, "PARIS!", "paris"),
        (CHINA, "The capital of China is Beijing.", "beijing"),
        (DENVILLE, "Denville is located in the United States.", "usa"),
        (DENVILLE, "USA", "usa"),
        (DENVILLE, "the U.S.", "usa"),
        (TEMPERATURE, "-40 degrees", "-40 degree"),
        (POPULATION, "About 1.5 million", "1500000"),
        (FRANCE, "What is the capital of France?", ""),
        (FRANCE, "", ""),
        (FRANCE, "I don't know.", ""),
    ],
)
def test_residual(question: str, answer: str, expected: str) -> None:
    assert am.residual(question, answer) == expected


def test_residual_keeps_what_the_question_does_not_say() -> None:
    assert am.residual(CHINA, "The capital of France is Paris.") == "france paris"


# ---------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-40", ["-40"]),
        ("It is −40 degrees.", ["-40"]),
        ("minus 40", ["-40"]),
        ("40", ["40"]),
        ("3.5", ["3.5"]),
        ("35", ["35"]),
        ("About 1.5 million", ["1500000"]),
        ("About 15 million", ["15000000"]),
        ("1,500,000 people", ["1500000"]),
        ("twenty-five", ["25"]),
        ("one hundred and twelve", ["112"]),
        ("three million", ["3000000"]),
        ("the 3rd of May", ["3"]),
        ("the third season", ["3"]),
        ("from 1939-1945", ["1939", "1945"]),
        ("It ended in 1066.", ["1066"]),
        ("Paris", []),
        ("", []),
    ],
)
def test_numbers(text: str, expected: list[str]) -> None:
    assert am.numbers(text) == expected


# ---------------------------------------------------------------------------- hand examples


@pytest.mark.parametrize(
    ("question", "a", "b"),
    [
        (FRANCE, "Paris", "The capital of France is Paris."),
        (FRANCE, "Paris", "paris"),
        (FRANCE, "Paris.", "It's Paris"),
        (FRANCE, "Paris, France", "Paris"),
        (DENVILLE, "USA", "The United States"),
        (DENVILLE, "Denville is in the US.", "United States of America"),
        (TEMPERATURE, "-40", "minus forty"),
        (POPULATION, "1.5 million", "1,500,000"),
        ("How many players are on a soccer team?", "11", "eleven players"),
        ("When did the Battle of Hastings take place?", "1066", "In 1066."),
        ("When did the Battle of Hastings take place?", "14 October 1066", "October 14, 1066"),
    ],
)
def test_equivalent(question: str, a: str, b: str) -> None:
    assert both(question, a, b) == (ENTAILMENT, ENTAILMENT)
    assert am.equivalent(question, a, b)


@pytest.mark.parametrize(
    ("question", "a", "b"),
    [
        (CHINA, "The capital of China is Beijing.", "The capital of China is Shanghai."),
        (CHINA, "Beijing", "Shanghai"),
        (DENVILLE, "Denville is in the United States.", "Denville is in Canada."),
        (FRANCE, "Paris", "Paris, Texas"),
        ("What is the capital of Brazil?", "Rio de Janeiro", "Rio"),
        ("When was the Magna Carta signed?", "June 1215", "May 1215"),
        ("How far is it?", "5 km", "5 miles"),
    ],
)
def test_not_equivalent(question: str, a: str, b: str) -> None:
    assert not am.equivalent(question, a, b)


@pytest.mark.parametrize(
    ("question", "a", "b"),
    [
        (TEMPERATURE, "-40", "40"),
        ("What is the pH of milk?", "3.5", "35"),
        (POPULATION, "About 1.5 million", "About 15 million"),
        ("When did the Battle of Hastings take place?", "1066", "1067"),
        ("When did the Battle of Hastings take place?", "14 October 1066", "15 October 1066"),
    ],
)
def test_number_conflicts_contradict(question: str, a: str, b: str) -> None:
    assert both(question, a, b) == (CONTRADICTION, CONTRADICTION)


def test_numbers_in_the_question_do_not_count() -> None:
    q = "Who won the 2010 World Cup?"
    assert am.equivalent(q, "Spain won the 2010 World Cup.", "Spain")


def test_a_number_against_no_number_is_neutral_not_contradiction() -> None:
    q = "When did the Battle of Hastings take place?"
    assert am.implication(q, "A long time ago", "1066") == NEUTRAL


def test_more_specific_answer_entails_only_one_way() -> None:
    q = "When did the Battle of Hastings take place?"
    assert am.implication(q, "14 October 1066", "1066") == ENTAILMENT
    assert am.implication(q, "1066", "14 October 1066") == NEUTRAL


# ---------------------------------------------------------------------------- edge cases


def test_empty_residuals() -> None:
    # Echoing the question says nothing: two echoes agree, an echo entails no real answer.
    echo = FRANCE
    assert am.equivalent(FRANCE, echo, "The capital of France.")
    assert am.implication(FRANCE, echo, "Paris") == NEUTRAL
    assert am.implication(FRANCE, "Paris", echo) == ENTAILMENT
    assert not am.equivalent(FRANCE, echo, "Paris")
    assert am.equivalent(FRANCE, "", "")
    assert not am.equivalent(FRANCE, "", "Paris")


@pytest.mark.parametrize(
    "abstention", ["I don't know", "I do not know.", "I’m not sure.", "I don't know the answer."]
)
def test_abstention_is_not_an_answer(abstention: str) -> None:
    assert am.analyse(FRANCE, abstention).abstains
    assert both(FRANCE, abstention, "Paris") == (NEUTRAL, NEUTRAL)
    assert not am.equivalent(FRANCE, abstention, "The capital of France is Paris.")
    assert am.equivalent(FRANCE, abstention, "I don't know.")


def test_hedged_answer_is_not_an_abstention() -> None:
    q = "When did the Battle of Hastings take place?"
    hedged = "I don't know exactly, but it was 1066."
    assert not am.analyse(q, hedged).abstains
    assert am.equivalent(q, hedged, "1066")
    assert not am.equivalent(q, hedged, "I don't know.")


def test_similarity_rescues_paraphrases_but_not_number_conflicts() -> None:
    calls: list[tuple[str, str]] = []

    def always(a: str, b: str) -> float:
        calls.append((a, b))
        return 1.0

    q = "Who painted the Mona Lisa?"
    assert not am.equivalent(q, "Leonardo da Vinci", "The Italian polymath")
    assert am.equivalent(q, "Leonardo da Vinci", "The Italian polymath", similarity=always)
    assert calls and all(isinstance(a, str) and isinstance(b, str) for a, b in calls)
    assert not am.equivalent(TEMPERATURE, "-40", "40", similarity=always)


def test_similarity_below_threshold_is_neutral() -> None:
    q = "Who painted the Mona Lisa?"
    res = am.implication(q, "Leonardo", "Michelangelo", similarity=lambda a, b: 0.5, threshold=0.9)
    assert res == NEUTRAL


def test_imports_no_heavy_modules() -> None:
    code = (
        "import sys, se_ray.answers.residual, se_ray.judges.residual; "
        "print(sorted({'torch','ray','vllm'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- candidates (heads)


@pytest.mark.parametrize(
    ("question", "answer", "expected"),
    [
        (
            "What is the capital of Taiwan?",
            "The capital of Taiwan is Kaohai, which is an independent zone.",
            "kaohai",
        ),
        (
            "What is the capital of Taiwan?",
            "The capital of Taiwan is Taipei, but with IRENO as its home.",
            "taipei",
        ),
        (DENVILLE, "In Japan, the city of Denville is also known as Shinjuku.", "japan"),
        (
            "In which US state is the city of Tucson?",
            "The largest city of the American state of Arizona.",
            "arizona",
        ),
        (
            "What is the currency of Kenya?",
            "The currency of Kenya is the Kenyan shilling.",
            "kenyan shilling",
        ),
        ("On which continent is Botswana?", "Botswana is located primarily in Central Africa.", "africa"),
        (
            "In which country is the city of Santee?",
            "Santee is in the South East of South Africa.",
            "south africa",
        ),
        ("On which continent is the Netherlands?", "It is in the North of Europe.", "europe"),
        (
            "What is the international calling code of Laos?",
            "Laos is a state in Southeast Asia. The international calling code of Laos is LAS.",
            "las",
        ),
        ("How far is it?", "About 5 km from here", "5 kilometre"),
        (FRANCE, "paris, i think", "paris"),
        (FRANCE, "I don't know.", ""),
    ],
)
def test_head(question: str, answer: str, expected: str) -> None:
    assert am.head(question, answer) == expected


@pytest.mark.parametrize(
    ("question", "a", "b"),
    [
        (
            "What is the capital of Taiwan?",
            "The capital of Taiwan is Kaohai, which is an independent zone.",
            "Kaohai",
        ),
        (
            "What is the capital of the United States?",
            "Washington D.C., not Mars.",
            "The capital is Washington.",
        ),
        (
            "In which US state is the city of Orlando?",
            "Orlando is in the state of Florida, in the southeast.",
            "Florida",
        ),
        ("On which continent is Botswana?", "Botswana is on the continent of Africa.", "In Southern Africa."),
        (
            "What is the capital of the US state of Texas?",
            "Austin",
            "The capital of Texas is Austin (since 1839).",
        ),
    ],
)
def test_elaboration_keeps_the_answer(question: str, a: str, b: str) -> None:
    assert am.equivalent(question, a, b)


@pytest.mark.parametrize(
    ("question", "a", "b"),
    [
        ("What is the capital of South Korea?", "Seoul", "Seoul and Busan"),
        ("In which country is the city of Pyongyang?", "North Korea", "South Korea"),
        ("In which country is the city of Santee?", "South Africa", "Africa"),
        ("On which continent is Brazil?", "South America", "North America"),
        ("What is the capital of Antigua and Barbuda?", "Port-au-Prince", "Port Royal, Jamaica"),
        ("What is the capital of the US state of Florida?", "Fort Myers", "Fort Canelo"),
        ("What is the currency of Kenya?", "The Kenyan kena", "The Kenyan kocho"),
        (
            "What is the capital of the US state of Texas?",
            "Austin",
            "The capital of Texas is El Paso, not Austin.",
        ),
    ],
)
def test_shared_words_do_not_make_the_same_answer(question: str, a: str, b: str) -> None:
    assert not am.equivalent(question, a, b)
