"""Question rows per relation (capital, continent, currency, calling code, a city's country,
a US state's capital, a US city's state), each with its references and popularity."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from se_ray.demo.geo.names import ascii_fold, country_names, display_name, names_overlap, slug, with_folded
from se_ray.demo.geo.tables import (
    CAPITAL_ALIASES,
    CONTINENTS,
    CURRENCY_SPELLINGS,
    DEFUNCT,
    QUALIFIED_CURRENCIES,
    TERRITORIES,
    TRANSCONTINENTAL,
    UK_NATIONS,
    UNINHABITED,
    US_CAPITAL_ALIASES,
    US_STATE_CAPITALS,
)

# How many questions of each city relation per population band (bands as in DESIGN.md).
CITY_BANDS = (
    (5_000_000, None),
    (1_000_000, 5_000_000),
    (200_000, 1_000_000),
    (50_000, 200_000),
    (15_000, 50_000),
)
CITY_COUNTRY_PER_BAND = 90
CITY_US_STATE_PER_BAND = 45
CALLING_CODE_LIMIT = 120
BAND_LABELS = ("q1 (most popular)", "q2", "q3", "q4", "q5 (least popular)")


def assign_bands(rows: list[dict[str, Any]]) -> None:
    """Quintiles of popularity within one relation (ties broken by id, so the split is stable)."""
    ranked = sorted(rows, key=lambda r: (-r["popularity"], r["id"]))
    for rank, row in enumerate(ranked):
        row["band"] = BAND_LABELS[rank * len(BAND_LABELS) // len(ranked)]


def row(relation: str, key: str, question: str, references: list[str], popularity: int) -> dict[str, Any]:
    return {
        "id": f"{relation}/{key}",
        "question": question,
        "references": references,
        "relation": relation,
        "popularity": int(popularity),
        "band": "",
        "answerable": True,
    }


def capital_rows(countries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for iso, c in countries.items():
        capital = c["capital"].strip()
        if not capital or iso in DEFUNCT or iso in UNINHABITED:
            continue
        refs = with_folded(CAPITAL_ALIASES.get(iso, [capital]))
        if any(slug(r) in (slug(c["name"]), slug(display_name(iso, c["name"]))) for r in refs):
            # "What is the capital of Singapore?", "... of Vatican City?"
            continue
        rows.append(
            row(
                "capital",
                slug(c["name"]),
                f"What is the capital of {display_name(iso, c['name'])}?",
                refs,
                c["population"],
            )
        )
    return rows


def continent_rows(countries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for iso, c in countries.items():
        if iso in DEFUNCT or iso in UNINHABITED or c["continentcode"] not in CONTINENTS:
            continue
        refs = list(CONTINENTS[c["continentcode"]])
        if iso in TRANSCONTINENTAL:
            refs += CONTINENTS[TRANSCONTINENTAL[iso]]
        rows.append(
            row(
                "continent",
                slug(c["name"]),
                f"On which continent is {display_name(iso, c['name'])}?",
                refs,
                c["population"],
            )
        )
    return rows


def currency_rows(countries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    codes_by_name: dict[str, set[str]] = defaultdict(set)
    for c in countries.values():
        if c["currencycode"]:
            codes_by_name[c["currencyname"].strip().lower()].add(c["currencycode"])
    rows = []
    for iso, c in countries.items():
        code, name = c["currencycode"], c["currencyname"].strip()
        if not code or iso in DEFUNCT or iso in UNINHABITED or code == "ZWG":
            continue
        if code in QUALIFIED_CURRENCIES:
            refs = QUALIFIED_CURRENCIES[code]
        elif len(codes_by_name[name.lower()]) > 1:
            continue  # a shared name without a qualified form here: the bare name would be ambiguous
        else:
            refs = CURRENCY_SPELLINGS.get(code, [name])
        rows.append(
            row(
                "currency",
                slug(c["name"]),
                f"What is the currency of {display_name(iso, c['name'])}?",
                with_folded(refs),
                c["population"],
            )
        )
    return rows


def calling_code_rows(countries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    plain = {iso: c["phone"].strip().lstrip("+") for iso, c in countries.items()}
    shared = Counter(plain.values())
    rows = []
    for iso, c in sorted(countries.items(), key=lambda kv: -kv[1]["population"]):
        code = plain[iso]
        if not code.isdigit() or shared[code] > 1 or iso in DEFUNCT or iso in UNINHABITED:
            continue
        rows.append(
            row(
                "calling_code",
                slug(c["name"]),
                f"What is the international calling code of {display_name(iso, c['name'])}?",
                [f"+{code}", code],
                c["population"],
            )
        )
    return rows[:CALLING_CODE_LIMIT]


def dominant_namesakes(big_cities: Iterable[dict[str, Any]]) -> set[int]:
    """geonameids of cities whose name is unambiguous: the most populous namesake has >= 10x the next."""
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for city in big_cities:
        by_name[ascii_fold(city["name"]).lower()].append(city)
    keep = set()
    for namesakes in by_name.values():
        namesakes.sort(key=lambda c: -c["population"])
        if len(namesakes) == 1 or namesakes[0]["population"] >= 10 * max(namesakes[1]["population"], 1):
            keep.add(namesakes[0]["geonameid"])
    return keep


def pick_by_band(cities: list[dict[str, Any]], per_band: int, rng: random.Random) -> list[dict[str, Any]]:
    picked = []
    for low, high in CITY_BANDS:
        band = sorted(
            (c for c in cities if c["population"] >= low and (high is None or c["population"] < high)),
            key=lambda c: c["geonameid"],
        )
        picked += band if len(band) <= per_band else rng.sample(band, per_band)
    return picked


def city_country_rows(
    cities: list[dict[str, Any]],
    countries: dict[str, dict[str, Any]],
    unambiguous: set[int],
    rng: random.Random,
) -> list[dict[str, Any]]:
    pool = []
    for city in cities:
        iso = city["countrycode"]
        if iso in TERRITORIES or iso not in countries or city["geonameid"] not in unambiguous:
            continue
        if names_overlap(city["name"], country_names(iso, countries[iso]["name"])):
            continue  # "Kuwait City", "Singapore": the question gives the answer away
        pool.append(city)
    rows = []
    for city in pick_by_band(pool, CITY_COUNTRY_PER_BAND, rng):
        iso = city["countrycode"]
        refs = country_names(iso, countries[iso]["name"])
        if iso == "GB" and city["admin1code"] in UK_NATIONS:
            refs.append(UK_NATIONS[city["admin1code"]])
        rows.append(
            row(
                "city_country",
                f"{slug(city['name'])}-{iso.lower()}",
                f"In which country is the city of {city['name']}?",
                refs,
                city["population"],
            )
        )
    return rows


def city_us_state_rows(
    cities: list[dict[str, Any]], states: dict[str, str], us_unambiguous: set[int], rng: random.Random
) -> list[dict[str, Any]]:
    pool = [
        c
        for c in cities
        if c["countrycode"] == "US"
        and c["admin1code"] in states
        and c["geonameid"] in us_unambiguous
        and not names_overlap(c["name"], [states[c["admin1code"]]])
    ]
    return [
        row(
            "city_us_state",
            f"{slug(c['name'])}-{c['admin1code'].lower()}",
            f"In which US state is the city of {c['name']}?",
            [states[c["admin1code"]]],
            c["population"],
        )
        for c in pick_by_band(pool, CITY_US_STATE_PER_BAND, rng)
    ]


def us_state_capital_rows(states: dict[str, str], cities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    population: Counter[str] = Counter()
    for city in cities:
        if city["countrycode"] == "US":
            population[city["admin1code"]] += city["population"]
    return [
        row(
            "us_state_capital",
            slug(states[code]),
            f"What is the capital of the US state of {states[code]}?",
            [capital, *US_CAPITAL_ALIASES.get(capital, [])],
            population[code],
        )
        for code, capital in US_STATE_CAPITALS.items()
    ]
