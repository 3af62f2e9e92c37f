"""Tests for se_ray.demo.ood.build: the out-of-distribution question sets and the shipped files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from se_ray import columns as col
from se_ray.demo.ood.build import BAND_LABELS, OUT_DIR, build, element_rows, state_rows

SHIPPED = ("ood_elements.jsonl", "ood_us_abbreviations.jsonl")


def test_element_rows_skip_word_like_symbols_and_band_by_atomic_number() -> None:
    elements = [
        (8, "O", "Oxygen"),
        (1, "H", "Hydrogen"),
        (2, "He", "Helium"),
        (53, "I", "Iodine"),
        (99, "Es", "X"),
    ]
    rows = element_rows(elements)
    assert [r["id"] for r in rows] == ["element_symbol/hydrogen", "element_symbol/oxygen"]
    assert rows[0]["question"] == "What is the chemical symbol of hydrogen?"
    assert rows[0]["references"] == ["H"] and rows[0]["answerable"] is True
    assert [r["band"] for r in rows] == [BAND_LABELS[0], BAND_LABELS[2]]  # 2 rows over 5 bands


def test_state_rows_oldest_first_without_word_like_codes() -> None:
    states = [
        ("Texas", "TX", 1845),
        ("Delaware", "DE", 1787),
        ("Oregon", "OR", 1859),
        ("New York", "NY", 1788),
    ]
    rows = state_rows(states)
    assert [r["id"] for r in rows] == [
        "us_state_abbreviation/delaware",
        "us_state_abbreviation/new-york",
        "us_state_abbreviation/texas",
    ]
    assert rows[1]["question"] == "What is the two-letter postal abbreviation of the US state of New York?"
    assert rows[2]["popularity"] == -1845


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sets_are_scorable_and_unique(name: str) -> None:
    rows = [json.loads(line) for line in (Path(OUT_DIR) / name).read_text().splitlines()]
    assert len(rows) >= 40
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(col.is_scorable(r) and r["references"] for r in rows)
    assert {r["band"] for r in rows} == set(BAND_LABELS)


def test_shipped_sets_are_what_the_build_writes(tmp_path: Path) -> None:
    pytest.importorskip("periodictable")
    pytest.importorskip("us")
    counts = build(str(tmp_path))
    assert set(counts) == set(SHIPPED)
    for name in SHIPPED:
        assert (tmp_path / name).read_text() == (Path(OUT_DIR) / name).read_text()
