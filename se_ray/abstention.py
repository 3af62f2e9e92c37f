"""The one abstention rule: whether an answer says "I don't know" instead of answering.

Clustering (``se_ray.answers.residual``), evaluation (``se_ray.evaluate``), the checkpoint
selection probe (``se_ray.train.selection``) and the report all read answers with
``is_abstention``. Pure Python (no numpy, ray, torch or vllm).

The rule, on the answer split into sentences (at ``.``, ``!``, ``?``, ``;`` and line breaks)
and each sentence normalised as SQuAD does (lowercase, punctuation and apostrophes dropped,
articles dropped, so "I don't know" reads ``i dont know``):

1. the *first* sentence, after an optional apology ("Sorry,", "I'm sorry, but",
   "Unfortunately,"), **starts** with an abstention phrase (``ABSTENTION_PHRASES``, or the
   configured abstention text), or says that what is asked about does not exist
   (``NONEXISTENCE_PHRASES``, anywhere in the first sentence: "Pondovia does not exist."),
   or is the single word "Unknown";
2. and nothing after the phrase commits to a candidate: no ``COMMITTING_WORDS`` ("I don't
   know exactly, but it was 1066.", "I'm not sure, maybe Lyon.") and no later sentence that
   opens with "because" ("I don't know why the sky is blue? Because of Rayleigh scattering.").

Anchoring at the start keeps answers that merely mention a phrase ("The answer is: I don't
know", "Nobody knows who wrote it.", "It is unknown.", "The capital of France is Paris, there
is no doubt.") as answers; an apology alone ("Sorry.") is not an abstention.
"""

from __future__ import annotations

import re
import string

__all__ = [
    "ABSTENTION_PHRASES",
    "COMMITTING_WORDS",
    "DEFAULT_ABSTENTION_TEXT",
    "NONEXISTENCE_PHRASES",
    "is_abstention",
    "normalised_tokens",
]

DEFAULT_ABSTENTION_TEXT = "I don't know the answer."


def _phrases(*texts: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(t.split()) for t in texts)


# In normalised form: apostrophes dropped ("dont", "im", "cant"), articles dropped.
ABSTENTION_PHRASES = _phrases(
    "i dont know",
    "i do not know",
    "i am not sure",
    "im not sure",
    "not sure",
    "i am not certain",
    "im not certain",
    "no idea",
    "i have no idea",
    "i cannot answer",
    "i cant answer",
    "i cannot say",
    "i cant say",
    "i am unable",
    "im unable",
    "i dont have",
    "i do not have",
    "no information",
    "not enough information",
    "there is no",
    "there isnt",
    "there are no",
)
# Said of the thing asked about, so they may follow its name: "Pondovia does not exist."
NONEXISTENCE_PHRASES = _phrases("does not exist", "doesnt exist", "do not exist", "dont exist")
# An apology before the phrase: "I'm sorry, but I don't know."
_LEAD_INS = _phrases("sorry", "im sorry", "i am sorry", "unfortunately", "honestly", "to be honest", "but")
# Words after the phrase that show the answer still commits to a candidate.
COMMITTING_WORDS = frozenset(
    {"but", "however", "though", "although", "think", "believe", "guess"}
    | {"probably", "perhaps", "maybe", "likely", "possibly", "might", "could"}
)
_UNKNOWN = ("unknown",)
_SENTENCE_END = re.compile(r"[.!?;\n]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d")


def normalised_tokens(text: str) -> list[str]:
    """SQuAD normalisation (lowercase, punctuation and curly quotes dropped, articles dropped),
    split into words."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def _sentences(answer: str) -> list[list[str]]:
    # Break before normalising (normalisation drops the full stops); "3.5" is not a break.
    parts = _SENTENCE_END.split(re.sub(r"(\d)\.(\d)", r"\1\2", answer))
    return [tokens for tokens in (normalised_tokens(p) for p in parts) if tokens]


def _strip_lead_ins(tokens: list[str]) -> list[str]:
    stripped = True
    while stripped and tokens:
        stripped = False
        for lead in _LEAD_INS:
            if tuple(tokens[: len(lead)]) == lead and len(tokens) > len(lead):
                tokens, stripped = tokens[len(lead) :], True
                break
    return tokens


def _phrase_end(first: list[str], phrases: tuple[tuple[str, ...], ...]) -> int | None:
    """Where the abstention phrase that opens (or, for non-existence, sits in) ``first`` ends."""
    for phrase in phrases:
        if tuple(first[: len(phrase)]) == phrase:
            return len(phrase)
    for phrase in NONEXISTENCE_PHRASES:
        width = len(phrase)
        for k in range(len(first) - width + 1):
            if tuple(first[k : k + width]) == phrase:
                return k + width
    if tuple(first) == _UNKNOWN:
        return 1
    return None


def is_abstention(answer: str, abstention_text: str = DEFAULT_ABSTENTION_TEXT) -> bool:
    """Whether ``answer`` abstains, by the rule in this module's docstring; ``abstention_text``
    (the text the model is trained to say) counts as one more opening phrase."""
    sentences = _sentences(answer)
    if not sentences:
        return False
    first = _strip_lead_ins(sentences[0])
    configured = tuple(normalised_tokens(abstention_text))
    phrases = ((configured,) if configured else ()) + ABSTENTION_PHRASES
    end = _phrase_end(first, phrases)
    if end is None:
        return False
    after = first[end:] + [t for s in sentences[1:] for t in s]
    if COMMITTING_WORDS.intersection(after):
        return False
    return not any(s[0] == "because" for s in sentences[1:])
