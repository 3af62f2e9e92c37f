"""Write ``se_ray/demo/arithmetic_questions.jsonl``: arithmetic questions graded by difficulty
(deterministic, standard library only).

A second kind of training question beside the geography relations: "What is 7 plus 5?" up to
"What is 190 times 47?". A small model answers the easy ones the same way every time and guesses
on the hard ones, so the semantic-entropy labels keep the answers it knows and abstain on the
rest within one more kind of question (``split.train_inputs``). Three relations (``addition``,
``subtraction``, ``multiplication``), five difficulty levels each by operand size (``band`` q1 =
easiest ... q5 = hardest, ``popularity`` minus the level), the same number of questions per level.
Operands come from a hash of (relation, level, counter), not ``random``, so the file is the same
under every Python. An answer never equals an operand, so containment cannot find it in a
sentence that repeats the question.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from se_ray.demo.ood.build import BAND_LABELS, OUT_DIR, write_jsonl

OUT_FILE = os.path.join(OUT_DIR, "arithmetic_questions.jsonl")
PER_LEVEL = 12
# fmt: off
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)
# fmt: on
Range = tuple[int, int]
# Operand ranges (inclusive) of the two numbers, per level 1..5.
ADDITION: tuple[tuple[Range, Range], ...] = (
    ((1, 9), (1, 9)),
    ((10, 99), (1, 9)),
    ((10, 99), (10, 99)),
    ((100, 999), (10, 99)),
    ((100, 999), (100, 999)),
)
MULTIPLICATION: tuple[tuple[Range, Range], ...] = (
    ((2, 9), (2, 9)),
    ((10, 20), (2, 9)),
    ((21, 99), (2, 9)),
    ((10, 99), (10, 99)),
    ((100, 999), (10, 99)),
)


def _draw(relation: str, level: int, counter: int, span: Range, which: int) -> int:
    digest = hashlib.sha256(f"{relation}/{level}/{counter}/{which}".encode()).digest()
    low, high = span
    return low + int.from_bytes(digest[:8], "big") % (high - low + 1)


def _question(relation: str, a: int, b: int) -> tuple[str, int] | None:
    """(the question, its answer) for two drawn operands, or None where the answer would equal
    an operand. Subtraction asks (a + b) minus b, so it inverts an addition."""
    if relation == "addition":
        word, left, right, answer = "plus", a, b, a + b
    elif relation == "subtraction":
        word, left, right, answer = "minus", a + b, b, a
    else:
        word, left, right, answer = "times", a, b, a * b
    if answer in (left, right):
        return None
    return f"What is {left} {word} {right}?", answer


def references(answer: int) -> list[str]:
    """The digits, and the number's word up to twenty ("12", "twelve")."""
    return [str(answer)] + ([NUMBER_WORDS[answer]] if answer < len(NUMBER_WORDS) else [])


def relation_rows(
    relation: str, levels: Sequence[tuple[Range, Range]], per_level: int = PER_LEVEL
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for level, (first, second) in enumerate(levels, start=1):
        seen: set[str] = set()
        counter = 0
        while len(seen) < per_level:
            a = _draw(relation, level, counter, first, 0)
            b = _draw(relation, level, counter, second, 1)
            counter += 1
            made = _question(relation, a, b)
            if made is None or made[0] in seen:
                continue
            question, answer = made
            seen.add(question)
            slug = question.removeprefix("What is ").removesuffix("?").replace(" ", "-")
            rows.append(
                {
                    "id": f"{relation}/{slug}",
                    "question": question,
                    "references": references(answer),
                    "relation": relation,
                    "popularity": -level,
                    "band": BAND_LABELS[level - 1],
                    "answerable": True,
                }
            )
    return rows


def arithmetic_rows(per_level: int = PER_LEVEL) -> list[dict[str, Any]]:
    makers: dict[str, Sequence[tuple[Range, Range]]] = {
        "addition": ADDITION,
        "subtraction": ADDITION,
        "multiplication": MULTIPLICATION,
    }
    return [r for relation, levels in makers.items() for r in relation_rows(relation, levels, per_level)]


def build(path: str = OUT_FILE) -> int:
    """Write the questions to ``path`` in a stable order by hashed id (any prefix mixes the
    relations and levels); returns how many."""
    rows = arithmetic_rows()
    write_jsonl(rows, path)
    return len(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT_FILE)
    args = parser.parse_args(argv)
    print(f"{args.out}: {build(args.out)} questions")


if __name__ == "__main__":
    main()
