"""Unanswerable questions: made-up country, city and state names, checked absent from every
name (and alternate name) GeoNames knows."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from se_ray.demo.geo.names import ascii_fold, slug

# Made-up names per question template.
FAKE_PER_TEMPLATE = 20

_ONSETS = [
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kl",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
_MIDDLES = ["l", "n", "r", "s", "v", "m", "nd", "rv", "lt", "rn", "st"]
_COUNTRY_ENDINGS = ("ia", "onia", "istan", "land", "mark", "ovia", "aria", "esia")
_CITY_ENDINGS = ("ville", "burg", "ford", "polis", "ton", "grad", "stad", "haven", "mouth", "field")

FAKE_TEMPLATES = (
    ("capital", "country", "What is the capital of {}?"),
    ("continent", "country", "On which continent is {}?"),
    ("currency", "country", "What is the currency of {}?"),
    ("calling_code", "country", "What is the international calling code of {}?"),
    ("city_country", "city", "In which country is the city of {}?"),
    ("city_us_state", "city", "In which US state is the city of {}?"),
    ("us_state_capital", "country", "What is the capital of the US state of {}?"),
)


def _made_up(rng: random.Random, kind: str) -> str:
    stem = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_MIDDLES) + rng.choice(_VOWELS)
    if kind == "city":
        return (stem + rng.choice(_CITY_ENDINGS)).capitalize()
    return (stem.rstrip("aeiou") + rng.choice(_COUNTRY_ENDINGS)).capitalize()


def known_names(data_dir: Path) -> set[str]:
    """Every name (and alternate name) GeoNames knows here, folded and lowercased."""
    names: set[str] = set()

    def add(name: str) -> None:
        names.add(ascii_fold(name).lower().strip())

    cities = json.loads((data_dir / "cities500.json").read_text())
    for city in cities.values() if isinstance(cities, dict) else cities:
        add(city["name"])
        for alt in city.get("alternatenames") or []:
            add(alt)
    for c in json.loads((data_dir / "countries.json").read_text()).values():
        add(c["name"])
        add(c["capital"])
    for s in json.loads((data_dir / "us_states.json").read_text()).values():
        add(s["name"])
    for county in json.loads((data_dir / "us_counties.json").read_text()):
        add(county["name"])
        add(county["name"].removesuffix(" County"))
    return names


def unanswerable_rows(rng: random.Random, known: set[str]) -> list[dict[str, Any]]:
    rows, used = [], set()
    for relation, kind, template in FAKE_TEMPLATES:
        made = 0
        while made < FAKE_PER_TEMPLATE:
            name = _made_up(rng, kind)
            if name.lower() in known or name in used:
                continue
            used.add(name)
            made += 1
            rows.append(
                {
                    "id": f"unanswerable-{relation}/{slug(name)}",
                    "question": template.format(name),
                    "references": [],
                    "relation": relation,
                    "popularity": 0,
                    "band": "unanswerable",
                    "answerable": False,
                }
            )
    return rows
