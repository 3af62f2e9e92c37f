"""Word lists the answer analysis reads: stopwords and filler, aliases,
number words, and the nouns, directions and units that shape an answer's candidate.

All entries are lowercase, accent-free and apostrophe-free, as ``se_ray.answers.tokens`` leaves
words ("whats", "dont").
"""

from __future__ import annotations


def words(text: str) -> frozenset[str]:
    return frozenset(text.split())


STOPWORDS = words(
    """
    a an the and or but nor of in on at to for from by with within into onto over under about as
    is are was were be been being am do does did done has have had having will would shall should
    can could may might must it its it's this that these those there here then than so such very
    which who whom whose what when where why how whats wheres whos
    i me my we our you your he him his she her they them their one ones
    called named known located situated found lies lie based considered officially official
    answer answers question correct right think believe guess probably likely perhaps maybe
    also just only really actually exactly approximately roughly around nearly almost about some
    currently now today still yes no not s however although though typically generally usually
    often sometimes primarily mainly mostly predominantly specifically particularly especially indeed
    either neither whether while if because since
    """
)
# Extra phrasing hedges that do not change which answer is given.
FILLER = words("city town capital country state nation place area region")

# Multi-word aliases folded to one token; longest match first.
ALIASES: dict[tuple[str, ...], str] = {
    ("united", "states", "of", "america"): "usa",
    ("united", "states"): "usa",
    ("us",): "usa",
    ("usa",): "usa",
    ("u", "s"): "usa",
    ("u", "s", "a"): "usa",
    ("united", "kingdom"): "uk",
    ("great", "britain"): "uk",
    ("britain",): "uk",
    ("u", "k"): "uk",
    ("washington", "dc"): "washington",
    ("washington", "d", "c"): "washington",
    ("new", "york", "city"): "new york",
    ("nyc",): "new york",
    ("st",): "saint",
    ("mt",): "mount",
    ("km",): "kilometre",
    ("kilometer",): "kilometre",
    ("kms",): "kilometre",
    ("mi",): "mile",
    ("ft",): "foot",
    ("feet",): "foot",
    ("metre",): "metre",
    ("meter",): "metre",
    ("kg",): "kilogram",
    ("lbs",): "pound",
    ("lb",): "pound",
    ("per", "cent"): "percent",
    ("%",): "percent",
    ("°",): "degree",
    ("centigrade",): "celsius",
}
MAX_ALIAS = max(len(k) for k in ALIASES)

# Number words: zero to nineteen, the tens, ordinals (a run ends at one) and scales.
ONES = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19,
}  # fmt: skip
TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}  # fmt: skip
ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
    "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12,
}  # fmt: skip
SCALES = {"hundred": 100, "thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12}
NUMBER_WORDS = {**ONES, **TENS, **ORDINALS}

# Abbreviations whose period does not end a sentence.
ABBREVIATIONS = words("st mt dr mr mrs ms jr sr no approx vs ft")

# A name right before one of these nouns modifies it ("the American state of", "the Indian
# subcontinent", "the Northeast US state"): it is no candidate answer.
GENERIC_NOUNS = words(
    """
    state states country countries nation city town region continent subcontinent destination island
    islands territory people language currency government coast part side area province peninsula
    empire county district capital community economy market culture heritage
    """
)
DIRECTIONS = words(
    """
    north south east west northern southern eastern western central northeast northwest southeast
    southwest northeastern northwestern southeastern southwestern upper lower
    """
)
# Adjectival directions refine an answer without changing it ("Central Africa" is in Africa);
# "South Africa", "North Korea" are other names and keep their direction.
REFINING_DIRECTIONS = words(
    "northern southern eastern western central northeastern northwestern southeastern southwestern"
)
# Units a number takes along into the candidate ("5 km" is not "5 miles").
UNITS = words(
    """
    kilometre mile metre foot inch yard centimetre millimetre kilogram gram pound ton tonne litre
    gallon percent degree celsius fahrenheit kelvin hour minute second day week month year decade
    century dollar euro cent acre hectare
    """
)
# Name endings of adjectives that take the next word along ("Kenyan shilling", "Indian rupee").
ADJECTIVE_ENDINGS = ("ian", "ean", "ese", "ish", "can", "yan", "ani", "aqi", "ic", "ch")
# Lowercase words that stay inside a name ("Trinidad and Tobago", "Rio de Janeiro").
CONNECTORS = words("of and the de do da das dos del la le les du van von di al el y & upon on")
