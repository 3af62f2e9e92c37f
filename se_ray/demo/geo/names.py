"""Name helpers: accent folding, id slugs, alias lists with accent-free spellings, and a
country as it reads inside a question."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from se_ray.demo.geo.tables import COUNTRY_ALIASES, DISPLAY_NAMES


def ascii_fold(text: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", ascii_fold(text).lower()).strip("-")


def with_folded(names: Iterable[str]) -> list[str]:
    """The names, each followed by its accent-free spelling where that differs, without repeats."""
    out: list[str] = []
    for name in names:
        for variant in (name.strip(), ascii_fold(name.strip())):
            if variant and variant not in out:
                out.append(variant)
    return out


_THE = re.compile(r"^(United |Republic |Democratic |Central African |Dominican |Czech )|Islands$|Territory$")
_THE_NAMES = frozenset({"Philippines", "Bahamas", "Gambia", "Maldives", "Comoros", "Seychelles"})


def display_name(iso: str, name: str) -> str:
    """The country as it reads inside a question: "the United States", "the Philippines"."""
    if iso in DISPLAY_NAMES:
        return DISPLAY_NAMES[iso]
    name = name.strip()
    return f"the {name}" if _THE.search(name) or name in _THE_NAMES else name


def country_names(iso: str, name: str) -> list[str]:
    return with_folded(COUNTRY_ALIASES.get(iso, [name]))


def names_overlap(city: str, names: Iterable[str]) -> bool:
    tokens = set(slug(city).split("-"))
    return any(set(slug(n).split("-")) <= tokens for n in names)
