"""Correctness judges: hand cases, the LLM judge's retry rule, the audit."""

import pytest

from se_ray.config import EvalConfig
from se_ray.judges.correctness import (
    ContainsJudge,
    ExactJudge,
    F1Judge,
    audit_judges,
    build_judge,
    combine_verdicts,
    diagnostic_judge,
    retry_indices,
)


def test_f1_judge_hand_cases():
    judge = F1Judge(0.5)
    questions = ["q"] * 5
    answers = ["Salzburg, Austria", "It is in Austria", "Vienna", "the 1988 season", ""]
    refs = [["Salzburg, Austria", "Austria"], ["Austria"], ["Salzburg"], ["1988"], ["1988"]]
    # F1: 1.0; "it is in austria" vs "austria": P 1/4 R 1 -> 0.4; 0; "1988 season" vs "1988": 2/3; empty: 0
    assert judge.judge(questions, answers, refs) == [True, False, False, True, False]
    assert F1Judge(0.3).judge(["q"], ["It is in Austria"], [["Austria"]]) == [True]


def test_exact_judge_hand_cases():
    judge = ExactJudge()
    answers = ["The Beatles", "It was the Beatles.", "Beatles fans", "Beat", "the"]
    refs = [["beatles"], ["Beatles"], ["The Beatles"], ["Beatles"], ["The"]]
    # exact after normalisation; containment as whole tokens; "Beat" is no token of it;
    # a reference normalising to nothing matches nothing
    assert judge.judge(["q"] * 5, answers, refs) == [True, True, True, False, False]


def test_judges_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        F1Judge().judge(["q"], ["a", "b"], [["a"]])


def test_retry_and_combine_verdicts():
    first = [True, None, False, None]
    assert retry_indices(first) == [1, 3]
    # the retry decides one, the other stays undecided -> no
    assert combine_verdicts(first, [True, None]) == [True, True, False, False]
    assert combine_verdicts([True, False], []) == [True, False]
    with pytest.raises(ValueError):
        combine_verdicts(first, [True])


def test_build_judge_by_name():
    assert isinstance(build_judge(EvalConfig(judge="f1")), F1Judge)
    assert build_judge(EvalConfig(judge="f1", f1_threshold=0.7)).threshold == 0.7
    assert isinstance(build_judge(EvalConfig(judge="exact")), ExactJudge)
    assert isinstance(build_judge(EvalConfig()), ContainsJudge)  # the CPU default
    with pytest.raises(ValueError, match="engine"):
        build_judge(EvalConfig(judge="llm"))
    assert isinstance(diagnostic_judge(EvalConfig(judge="llm")), ContainsJudge)


def test_contains_judge_grades_sentence_answers_the_f1_judge_fails():
    answers = ["The capital of France is Paris.", "Paris or Lyon", "Lyon"]
    refs = [["Paris"]] * 3
    assert ContainsJudge().judge(["q"] * 3, answers, refs) == [True, False, False]
    # F1: the sentence scores 0.33 (wrong); the hedge 0.5 (right): the opposite of what is meant
    assert F1Judge().judge(["q"] * 3, answers, refs) == [False, True, False]


def test_audit_counts_each_judge_and_shows_disagreements():
    rows = [{"question": f"q{i}", "references": ["Paris"]} for i in range(4)] + [
        {"question": "q", "references": []}
    ]
    answers = ["Paris", "The capital of France is Paris.", "Lyon", "I don't know the answer.", "Rome"]
    audit = audit_judges(rows, answers, [False, False, False, True, False], EvalConfig())
    assert audit["answered"] == 3  # the abstention and the row without references are left out
    assert audit["correct"] == {"contains": 2, "f1": 1, "exact": 2}
    assert audit["disagreements"] == 1
    assert audit["examples"][0]["answer"] == "The capital of France is Paris."
    assert audit["examples"][0]["f1"] is False and audit["examples"][0]["contains"] is True
