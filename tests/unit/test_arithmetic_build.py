"""Tests for se_ray.demo.arithmetic.build: the arithmetic training questions and the shipped file."""

from __future__ import annotations

import json
import operator
import re
from collections import Counter
from pathlib import Path

from se_ray import columns as col
from se_ray.demo.arithmetic.build import (
    ADDITION,
    BAND_LABELS,
    MULTIPLICATION,
    OUT_FILE,
    PER_LEVEL,
    arithmetic_rows,
    build,
    references,
    relation_rows,
)
from se_ray.metrics import contains_correct

OPERATORS = {"plus": operator.add, "minus": operator.sub, "times": operator.mul}
QUESTION = re.compile(r"What is (\d+) (plus|minus|times) (\d+)\?")


def _operands(row: dict) -> tuple[int, str, int]:
    match = QUESTION.fullmatch(row["question"])
    assert match, row["question"]
    return int(match[1]), match[2], int(match[3])


def test_every_answer_is_right_and_never_an_operand() -> None:
    for row in arithmetic_rows():
        left, word, right = _operands(row)
        answer = OPERATORS[word](left, right)
        assert row["references"][0] == str(answer)
        assert answer not in (left, right) and answer > 0
        # a sentence that only repeats the question is not judged right
        assert not contains_correct(row["question"], row["references"])
        assert contains_correct(f"{left} {word} {right} is {answer:,}.", row["references"])


def test_levels_grade_operand_size_and_fill_the_bands() -> None:
    rows = relation_rows("multiplication", MULTIPLICATION, per_level=5)
    assert Counter(r["band"] for r in rows) == dict.fromkeys(BAND_LABELS, 5)
    for row in rows:
        level = -row["popularity"]
        (low_a, high_a), (low_b, high_b) = MULTIPLICATION[level - 1]
        left, _, right = _operands(row)
        assert low_a <= left <= high_a and low_b <= right <= high_b
        assert row["band"] == BAND_LABELS[level - 1]
    subtraction = relation_rows("subtraction", ADDITION, per_level=3)
    for row in subtraction:  # (a + b) minus b: the answer a lies in the first addition range
        left, _, right = _operands(row)
        low, high = ADDITION[-row["popularity"] - 1][0]
        assert low <= left - right <= high


def test_references_give_small_numbers_their_word() -> None:
    assert references(12) == ["12", "twelve"]
    assert references(20) == ["20", "twenty"]
    assert references(21) == ["21"]


def test_shipped_file_is_what_the_build_writes(tmp_path: Path) -> None:
    out = tmp_path / "arithmetic_questions.jsonl"
    assert build(str(out)) == 3 * len(BAND_LABELS) * PER_LEVEL
    assert out.read_text() == Path(OUT_FILE).read_text()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(col.is_scorable(r) and r["answerable"] for r in rows)
    relations = ("addition", "subtraction", "multiplication")
    assert Counter(r["relation"] for r in rows) == dict.fromkeys(relations, 60)
    assert {r["relation"] for r in rows[:12]} == {"addition", "subtraction", "multiplication"}  # mixed order
