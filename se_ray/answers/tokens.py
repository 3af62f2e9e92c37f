"""Tokens of an answer: accent-folded lowercase words, numbers as signed canonical decimals
("-40", "3.5", "1500000", "25" for "twenty-five"), aliases folded ("United States" -> "usa"),
each word marked as part of a capitalised name or not and with the break that follows it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from se_ray.answers.lexicon import (
    ABBREVIATIONS,
    ALIASES,
    MAX_ALIAS,
    NUMBER_WORDS,
    ONES,
    ORDINALS,
    SCALES,
    TENS,
)

# A digit number: optional sign (only where it cannot be a range dash), thousands groups,
# decimals, an ordinal suffix, then an optional scale word.
_DIGITS = re.compile(
    r"(?<![\w.,])(?P<sign>[-\u2212]|minus\s+)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?(?:st|nd|rd|th)?"
    r"(?:\s*(?P<scale>hundred|thousand|million|billion|trillion)\b)?",
    re.IGNORECASE,
)
_WORD = re.compile(r"[a-z0-9]+|%|°")
# Marks a number already parsed from digits while the text is split into words.
_NUMBER_MARK = "\x00"
_HARD_END = tuple(".!?;:)]")


def fold(text: str) -> str:
    """Accents, curly quotes and the minus sign folded to ASCII; case kept (it marks names)."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u2212", "-")
    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))


def fmt(value: float) -> str:
    """A number's canonical text: integers without a decimal point, so "1.5 million" = "1500000"."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(round(value, 9))


def word_numbers(words: Sequence[str]) -> list[tuple[int, int, float]]:
    """(start, end, value) of number-word runs: "twenty five", "one hundred", "three million"."""
    found, i = [], 0
    while i < len(words):
        if words[i] not in NUMBER_WORDS:  # a scale word alone ("hundreds") is not a count
            i += 1
            continue
        start, total, current = i, 0.0, 0.0
        while i < len(words):
            w = words[i]
            if w in ONES or w in ORDINALS:
                current += ONES.get(w, ORDINALS.get(w, 0))
            elif w in TENS:
                current += TENS[w]
            elif w in SCALES and i > start:
                scale = SCALES[w]
                if scale == 100:
                    current *= 100
                else:
                    total += current * scale
                    current = 0.0
            elif w == "and" and i > start and i + 1 < len(words) and words[i + 1] in NUMBER_WORDS:
                pass
            else:
                break
            i += 1
            if words[i - 1] in ORDINALS:
                break
        found.append((start, i, total + current))
    return found


@dataclass(frozen=True)
class Tok:
    text: str  # lowercase word, or a number as a canonical decimal
    name: bool  # part of a capitalised word (names mark the answer's candidates)
    number: bool
    brk: int  # what follows: 0 nothing, 1 a comma, 2 a hard break (sentence end, bracket, colon)


def _word_flags(word: str) -> tuple[bool, int]:
    letters = [ch for ch in word if ch.isalpha()]
    name = bool(letters) and letters[0].isupper()
    core = word.rstrip("\"'*")
    if core.endswith(","):
        return name, 1
    if core.endswith(_HARD_END):
        bare = core.rstrip(".").lower()
        # "D.C.", "U.S.", "St.", initials: a period inside an abbreviation is no sentence end.
        if core.endswith(".") and ("." in bare or bare in ABBREVIATIONS or len(bare) == 1):
            return name, 0
        return name, 2
    return name, 0


def tokenize(text: str) -> list[Tok]:
    folded = fold(text)
    pieces, last = [], 0
    for m in _DIGITS.finditer(folded):
        pieces.append(folded[last : m.start()])
        value = float(m.group("int").replace(",", "") + ("." + m.group("frac") if m.group("frac") else ""))
        if m.group("scale"):
            value *= SCALES[m.group("scale").lower()]
        if m.group("sign"):
            value = -value
        pieces.append(f" {_NUMBER_MARK}{fmt(value)}{_NUMBER_MARK}")
        last = m.end()
    pieces.append(folded[last:])
    toks: list[Tok] = []
    for word in "".join(pieces).split():
        if word.startswith(("(", "[")) and toks:
            toks[-1] = Tok(toks[-1].text, toks[-1].name, toks[-1].number, 2)
        if word.startswith(_NUMBER_MARK):
            value, _, rest = word[1:].partition(_NUMBER_MARK)
            _, brk = _word_flags(rest) if rest else (False, 0)
            toks.append(Tok(value, False, True, brk))
            continue
        name, brk = _word_flags(word)
        subs = _WORD.findall(word.lower().replace("'", ""))
        if not subs:
            if toks and brk:
                toks[-1] = Tok(toks[-1].text, toks[-1].name, toks[-1].number, max(brk, toks[-1].brk))
            continue
        toks += [Tok(sub, name, False, brk if k == len(subs) - 1 else 0) for k, sub in enumerate(subs)]
    return _fold_aliases(_merge_number_words(toks))


def _merge_number_words(toks: list[Tok]) -> list[Tok]:
    words = [t.text if not t.number else "" for t in toks]
    out, j = [], 0
    for start, end, value in word_numbers(words):
        if start > j and words[start - 1] in ("minus", "negative"):
            start, value = start - 1, -value
        out += toks[j:start]
        out.append(Tok(fmt(value), False, True, toks[end - 1].brk))
        j = end
    return out + toks[j:]


def _fold_aliases(toks: list[Tok]) -> list[Tok]:
    out, i = [], 0
    while i < len(toks):
        for size in range(min(MAX_ALIAS, len(toks) - i), 0, -1):
            group = toks[i : i + size]
            if any(t.number for t in group) or any(t.brk for t in group[:-1] if t.brk == 2):
                continue
            key = tuple(t.text for t in group)
            if key in ALIASES:
                name = any(t.name for t in group)
                parts = ALIASES[key].split()
                last = len(parts) - 1
                out += [Tok(p, name, False, group[-1].brk if k == last else 0) for k, p in enumerate(parts)]
                i += size
                break
        else:
            out.append(toks[i])
            i += 1
    return out


def stem(token: str) -> str:
    # Plural -s only; applied to question and answer alike, so a wrong stem still matches.
    if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return token


def contains(tokens: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether ``pattern`` occurs in ``tokens`` as a contiguous run."""
    n = len(pattern)
    return any(tuple(tokens[i : i + n]) == tuple(pattern) for i in range(len(tokens) - n + 1))
