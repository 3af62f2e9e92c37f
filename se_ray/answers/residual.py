"""Offline entailment between two answers to the same question, without a model download.

What an answer says beyond its question is its *residual*: its tokens after SQuAD-style
normalisation (case, punctuation, articles, accents), minus the question's own words,
stopwords and filler ("is located in", "the answer is"), with numbers kept as signed
decimals so that "-40" / "40" and "3.5" / "35" stay apart ("1.5 million" = "1,500,000",
"twenty-five" = "25"), and a few aliases folded ("USA" = "United States").

Sampled answers are sentences that restate the question and then elaborate ("The capital of
Taiwan is Kaohai, which is an independent zone."). What decides their meaning class is the
candidate they offer, their *head*: the content of the first run of capitalised words (and
of numbers with their unit, when the question asks for a number) in the sentence that
restates most of the question. A run right before a generic noun after an adjective ("the
American state of") is a modifier, not a candidate; "Kenyan shilling" keeps its noun;
adjectival directions refine ("Central Africa" is Africa, "South Africa" is not). An answer
without capitalised words ("paris") offers its first phrase of content words.

``implication(question, premise, hypothesis)`` decides, in this order:

1. abstentions (``se_ray.abstention.is_abstention``, the rule evaluation uses too): two
   abstentions entail each other; an abstention and an answer are NEUTRAL both ways;
2. a hypothesis with an empty residual (an echo of the question) is entailed by anything;
   an empty premise entails nothing else;
3. numbers in the heads: when each side states a number the other does not, CONTRADICTION;
4. containment: the hypothesis's head within the premise's head -> ENTAILMENT (so "Paris"
   and "The capital of France is Paris." entail each other, "Paris, Texas" entails "Paris"
   but not the reverse);
5. optionally ``similarity(premise_head, hypothesis_head) >= threshold`` (e.g. the cosine of
   sentence embeddings of the heads, when their numbers agree) -> ENTAILMENT; else NEUTRAL.

Strict bidirectional equivalence, as the semantic-entropy clustering uses it, is ENTAILMENT
both ways (``equivalent``). ``se_ray.judges.residual.ResidualJudge`` wraps this in the judge
protocol of ``se_ray.judges.entailment``. Pure Python: no torch, ray or vllm import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from se_ray.abstention import ABSTENTION_PHRASES, NONEXISTENCE_PHRASES, is_abstention
from se_ray.answers.lexicon import (
    ADJECTIVE_ENDINGS,
    CONNECTORS,
    DIRECTIONS,
    FILLER,
    GENERIC_NOUNS,
    REFINING_DIRECTIONS,
    STOPWORDS,
    UNITS,
)
from se_ray.answers.tokens import Tok, contains, fold, stem, tokenize
from se_ray.judges.labels import CONTRADICTION, ENTAILMENT, NEUTRAL

__all__ = [
    "Residual",
    "Similarity",
    "analyse",
    "equivalent",
    "head",
    "implication",
    "numbers",
    "residual",
]

Similarity = Callable[[str, str], float]
HEDGE_PHRASES = ABSTENTION_PHRASES + NONEXISTENCE_PHRASES

_NUMERIC_QUESTION = re.compile(
    r"\b(how (many|much|long|old|far|tall|big|high|large|deep|often|fast|heavy)|when|what year|which year|"
    r"what date|what time|population|number|code|temperature|percentage|percent|average|rate|age|ph)\b"
)


@dataclass(frozen=True)
class Residual:
    """What an answer adds to its question."""

    tokens: tuple[str, ...]  # content tokens in order (numbers as canonical decimals)
    head: frozenset[str]  # content tokens of the first name (or number) it offers: its candidate answer
    abstains: bool

    @property
    def text(self) -> str:
        return " ".join(self.tokens)

    @property
    def head_text(self) -> str:
        return " ".join(dict.fromkeys(t for t in self.tokens if t in self.head))


@lru_cache(maxsize=4096)
def _question(question: str) -> tuple[frozenset[str], frozenset[str], bool]:
    toks = tokenize(question)
    words = frozenset(stem(t.text) for t in toks if not t.number)
    numbers_ = frozenset(t.text for t in toks if t.number)
    return words, numbers_, bool(_NUMERIC_QUESTION.search(fold(question).lower()))


def _runs(toks: Sequence[Tok], numeric: bool) -> list[list[int]]:
    """Index runs of consecutive name tokens (numbers too when the question asks for one)."""
    runs: list[list[int]] = []
    current: list[int] = []

    def namey(k: int) -> bool:
        return toks[k].name or (numeric and toks[k].number)

    for k, t in enumerate(toks):
        follows = k + 1 < len(toks) and namey(k + 1)
        inside = bool(current) and t.text in CONNECTORS and follows and toks[current[-1]].brk == 0
        if namey(k) or inside:
            current.append(k)
        elif current:
            runs.append(current)
            current = []
        if current and (t.brk == 2 or (t.brk == 1 and not follows)):
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def _answering_first(runs: list[list[int]], toks: Sequence[Tok], q_words: frozenset[str]) -> list[list[int]]:
    """The runs of the sentence that restates most of the question first ("... The calling code
    of Laos is LAS." after a preamble about Laos), then the others, each group in order."""
    sentence, starts = [], 0
    for k, t in enumerate(toks):
        sentence.append(starts)
        if t.brk == 2:
            starts = k + 1
    overlap: dict[int, int] = {}
    for k, t in enumerate(toks):
        if not t.number and stem(t.text) in q_words and t.text not in STOPWORDS:
            overlap[sentence[k]] = overlap.get(sentence[k], 0) + 1
    best = max(overlap.items(), key=lambda kv: (kv[1], -kv[0]))[0] if overlap else 0
    return [r for r in runs if sentence[r[0]] == best] + [r for r in runs if sentence[r[0]] != best]


def _run_head(run: list[int], toks: Sequence[Tok], contents: Sequence[str | None]) -> frozenset[str] | None:
    """The candidate a run of names offers, or None when the run offers none (a modifier, a
    bare direction)."""
    words = {c for c in (contents[k] for k in run) if c is not None}
    last, after = run[-1], run[-1] + 1
    joined = after < len(toks) and toks[last].brk == 0 and toks[last].name and contents[last] is not None
    adjective = joined and toks[last].text.endswith(ADJECTIVE_ENDINGS)
    if adjective and toks[after].text in GENERIC_NOUNS:
        return None  # "the American state of ...": a modifier, not a candidate
    if not words or words <= DIRECTIONS:
        return None
    if adjective and contents[after] is not None:
        words.add(contents[after])
    for k in run:
        if toks[k].number and k + 1 < len(toks) and contents[k + 1] in UNITS and not toks[k].brk:
            words.add(contents[k + 1])
    # "the North of Europe", "the south of France": the direction refines the place after it.
    pointing = {contents[k] for k in run[:-1] if toks[k].text in DIRECTIONS and toks[k + 1].text == "of"}
    refined = words - REFINING_DIRECTIONS - pointing
    return frozenset(refined or words)


def _first_phrase(toks: Sequence[Tok], contents: Sequence[str | None]) -> frozenset[str]:
    """No name offered ("the english language", "paris"): the first phrase of content words."""
    phrase: list[str] = []
    for k, c in enumerate(contents):
        if c is not None:
            phrase.append(c)
            if toks[k].brk:
                break
        elif phrase:
            break
    return frozenset(phrase)


@lru_cache(maxsize=65536)
def analyse(question: str, answer: str) -> Residual:
    q_words, q_numbers, numeric = _question(question)
    toks = tokenize(answer)
    texts = [t.text for t in toks]
    # Whether it abstains is the one rule's call; the hedge's words are never content.
    abstains = is_abstention(answer)
    hedging = any(contains(texts, p) for p in HEDGE_PHRASES)
    hedge = {w for p in HEDGE_PHRASES for w in p} if hedging else set()

    def content(k: int) -> str | None:
        t = toks[k]
        if t.number:
            return None if t.text in q_numbers else t.text
        s = stem(t.text)
        if s in q_words or t.text in STOPWORDS or s in STOPWORDS or t.text in FILLER or t.text in hedge:
            return None
        return s

    contents = [content(k) for k in range(len(toks))]
    kept = [c for c in contents if c is not None]
    head_: frozenset[str] = frozenset()
    for run in _answering_first(_runs(toks, numeric), toks, q_words):
        candidate = _run_head(run, toks, contents)
        if candidate is not None:
            head_ = candidate
            break
    if not head_:
        head_ = _first_phrase(toks, contents)
    return Residual(tokens=tuple(kept), head=head_, abstains=abstains)


def residual(question: str, answer: str) -> str:
    """The answer's content beyond the question, normalised ("" for an abstention)."""
    r = analyse(question, answer)
    return "" if r.abstains else r.text


def head(question: str, answer: str) -> str:
    """The answer's candidate: the content of the first name or number it offers (else its residual)."""
    r = analyse(question, answer)
    return "" if r.abstains else r.head_text


def numbers(text: str) -> list[str]:
    """Numbers stated in ``text`` as canonical decimals: "-40", "3.5", "1500000", "25"."""
    return [t.text for t in tokenize(text) if t.number]


# ---------------------------------------------------------------------------- judgement


def _is_number(token: str) -> bool:
    return bool(token) and (token[0].isdigit() or (token[0] == "-" and token[1:2].isdigit()))


def implication(
    question: str,
    premise: str,
    hypothesis: str,
    similarity: Similarity | None = None,
    threshold: float = 0.9,
) -> int:
    """CONTRADICTION, NEUTRAL or ENTAILMENT: does ``premise`` entail ``hypothesis`` as answers to
    ``question``? ``similarity`` scores two candidate texts (e.g. an embedding cosine)."""
    p, h = analyse(question, premise), analyse(question, hypothesis)
    if p.abstains or h.abstains:
        return ENTAILMENT if p.abstains and h.abstains else NEUTRAL
    if not h.tokens:  # the hypothesis adds nothing to the question: anything entails it
        return ENTAILMENT
    if not p.tokens:
        return NEUTRAL
    p_numbers = {t for t in p.head if _is_number(t)}
    h_numbers = {t for t in h.head if _is_number(t)}
    if p_numbers - h_numbers and h_numbers - p_numbers:
        return CONTRADICTION
    if h.head <= p.head:
        return ENTAILMENT
    if similarity is not None and not (p_numbers ^ h_numbers):
        score = similarity(p.head_text, h.head_text)
        if not math.isnan(score) and score >= threshold:
            return ENTAILMENT
    return NEUTRAL


def equivalent(
    question: str,
    a: str,
    b: str,
    similarity: Similarity | None = None,
    threshold: float = 0.9,
) -> bool:
    """Strict bidirectional entailment."""
    return (
        implication(question, a, b, similarity, threshold) == ENTAILMENT
        and implication(question, b, a, similarity, threshold) == ENTAILMENT
    )
