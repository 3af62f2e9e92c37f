"""Write the out-of-distribution question sets ``se_ray/demo/ood_*.jsonl`` (deterministic).

Two sets, neither about the geography relations the demo trains on:

- ``ood_elements.jsonl``: "What is the chemical symbol of oxygen?" for the elements of atomic
  number 1-56, from the PyPI package ``periodictable`` (public domain, NIST data); banded by
  atomic number (lighter elements are the better known);
- ``ood_us_abbreviations.jsonl``: "What is the two-letter postal abbreviation of the US state of
  Texas?" for the 50 states, from the PyPI package ``us`` (BSD-3-Clause, Sunlight Labs);
  banded by the order in which the states joined the Union.

Rows are written in a stable order by hashed id, so any prefix mixes the bands. Both
packages are build-time dependencies only (the ``dev`` extra). Answers that are also common words
("I", "He", "In", "OR", "ME", ...) are left out: the containment judge would find them in
almost any sentence.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

OUT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_ATOMIC_NUMBER = 56
BAND_LABELS = ("q1 (most popular)", "q2", "q3", "q4", "q5 (least popular)")
# Element symbols and state codes that are English words (or "I"): containment would match them
# in sentences that do not name them ("He was ...", "... in Boston", "Paris or Lyon").
WORD_LIKE = frozenset({"i", "he", "in", "as", "at", "be", "no", "me", "or", "oh", "ok", "hi", "la"})


def _banded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bands by the rows' order (best known first), in equal fifths."""
    for rank, row in enumerate(rows):
        row["band"] = BAND_LABELS[rank * len(BAND_LABELS) // len(rows)]
    return rows


def _row(relation: str, key: str, question: str, references: list[str], rank: int) -> dict[str, Any]:
    return {
        "id": f"{relation}/{key}",
        "question": question,
        "references": references,
        "relation": relation,
        "popularity": rank,
        "band": "",
        "answerable": True,
    }


def element_rows(elements: Sequence[tuple[int, str, str]]) -> list[dict[str, Any]]:
    """(atomic number, symbol, name) → one question per element of number 1..MAX_ATOMIC_NUMBER
    whose symbol is not word-like; ``popularity`` is minus the atomic number."""
    rows = [
        _row(
            "element_symbol", name.lower(), f"What is the chemical symbol of {name.lower()}?", [sym], -number
        )
        for number, sym, name in sorted(elements)
        if 1 <= number <= MAX_ATOMIC_NUMBER and sym.lower() not in WORD_LIKE
    ]
    return _banded(rows)


def state_rows(states: Sequence[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """(name, postal code, statehood year) → one question per state whose code is not word-like,
    oldest first; ``popularity`` is minus the statehood year."""
    rows = [
        _row(
            "us_state_abbreviation",
            name.lower().replace(" ", "-"),
            f"What is the two-letter postal abbreviation of the US state of {name}?",
            [code],
            -year,
        )
        for name, code, year in sorted(states, key=lambda s: (s[2], s[0]))
        if code.lower() not in WORD_LIKE
    ]
    return _banded(rows)


def _packaged_elements() -> list[tuple[int, str, str]]:
    import periodictable

    return [(e.number, e.symbol, e.name) for e in periodictable.elements if e.number >= 1]


def _packaged_states() -> list[tuple[str, str, int]]:
    import us

    return [(s.name, s.abbr, int(s.statehood_year)) for s in us.states.STATES]


def shuffled(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stable order by hashed id, so any prefix (``split.ood_limit``) mixes the bands."""
    return sorted(rows, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())


def write_jsonl(rows: Sequence[dict[str, Any]], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in shuffled(rows):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build(out_dir: str = OUT_DIR) -> dict[str, int]:
    """Write both sets into ``out_dir``; returns the number of questions per file."""
    sets = {
        "ood_elements.jsonl": element_rows(_packaged_elements()),
        "ood_us_abbreviations.jsonl": state_rows(_packaged_states()),
    }
    for name, rows in sets.items():
        write_jsonl(rows, os.path.join(out_dir, name))
    return {name: len(rows) for name, rows in sets.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=OUT_DIR)
    args = parser.parse_args(argv)
    for name, n in build(args.out_dir).items():
        print(f"{name}: {n} questions")


if __name__ == "__main__":
    main()
