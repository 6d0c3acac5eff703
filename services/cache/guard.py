"""A second look at the best semantic candidate before it is served.

Embeddings place "is port 6379 open?" next to "is port 6379 closed?" and "refund
of $20" next to "refund of $200". The guard refuses a candidate whose question
differs from the query in polarity (a negation or an opposite word), in the numbers
it names, or in the names it mentions. It is deliberately lexical and cheap (tens of
microseconds): it only ever turns a hit into a miss, so its cost is a lost hit,
never a wrong answer. `costmesh cache eval` measures both sides of that trade.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_APOSTROPHES = str.maketrans("", "", "'\u2019")
_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019]*|\d+(?:[.,:/]\d+)*")
_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")

_NEGATIONS = frozenset(
    {
        "not", "no", "never", "cannot", "cant", "without", "nothing", "none", "nobody",
        "neither", "nor", "unable", "fail", "failed", "fails", "didnt", "doesnt", "dont",
        "isnt", "arent", "wasnt", "werent", "wont", "wouldnt", "shouldnt", "couldnt",
        "havent", "hasnt", "hadnt",
    }
)  # fmt: skip

# Words whose swap reverses a question's meaning while barely moving its embedding.
_OPPOSITES = (
    ("open", "closed"), ("open", "close"), ("on", "off"), ("enable", "disable"),
    ("enabled", "disabled"), ("increase", "decrease"), ("add", "remove"),
    ("before", "after"), ("start", "stop"), ("lock", "unlock"), ("locked", "unlocked"),
    ("activate", "deactivate"), ("accept", "reject"), ("accepted", "rejected"),
    ("include", "exclude"), ("buy", "sell"), ("deposit", "withdraw"),
    ("deposits", "withdrawals"), ("debit", "credit"), ("minimum", "maximum"),
    ("min", "max"), ("more", "less"), ("higher", "lower"), ("send", "receive"),
    ("sent", "received"), ("upload", "download"), ("import", "export"),
    ("subscribe", "unsubscribe"), ("login", "logout"), ("true", "false"), ("yes", "no"),
    ("allow", "block"), ("allowed", "blocked"), ("upgrade", "downgrade"),
    ("incoming", "outgoing"), ("inbound", "outbound"), ("first", "last"),
    ("private", "public"), ("online", "offline"), ("connect", "disconnect"),
    ("install", "uninstall"), ("join", "leave"), ("win", "lose"),
    # Whose: "change my name" is not "change your name" (measured: clinc150).
    ("my", "your"), ("me", "you"), ("mine", "yours"), ("myself", "yourself"),
)  # fmt: skip
# "set a four minute timer" names the same number as "set a 4 minute timer".
_SMALL_NUMBERS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
)  # fmt: skip
_NUMBER_WORDS = {word: str(value) for value, word in enumerate(_SMALL_NUMBERS)} | {
    "thirty": "30", "forty": "40", "fifty": "50", "hundred": "100", "thousand": "1000",
}  # fmt: skip
_OPPOSITE = frozenset(_OPPOSITES) | frozenset((b, a) for a, b in _OPPOSITES)


@dataclass(frozen=True)
class _Features:
    negations: int
    words: frozenset[str]
    numbers: frozenset[str]
    names: frozenset[str]


def _features(text: str) -> _Features:
    tokens = _WORD.findall(text)
    plain = [t.lower().translate(_APOSTROPHES) for t in tokens]
    words = frozenset(plain)
    # "don't" and "dont" both negate; so does any other "...n't" contraction, but
    # not the "or not" of "approved yet or not".
    negations = sum(
        1
        for i, (token, word) in enumerate(zip(tokens, plain, strict=True))
        if (word in _NEGATIONS or token.lower().endswith(("n't", "n\u2019t")))
        and not (word == "not" and i > 0 and plain[i - 1] == "or")
    )
    shouting = text.isupper()  # all capitals say nothing about names
    names = frozenset(
        t.lower()
        for i, t in enumerate(tokens)
        if not shouting and _looks_like_name(t, first=i == 0 or _starts_sentence(text, t))
    )
    numbers = frozenset(n.replace(",", "") for n in _NUMBER.findall(text))
    numbers |= {_NUMBER_WORDS[w] for w in plain if w in _NUMBER_WORDS}
    return _Features(negations, words, numbers, names)


def _looks_like_name(token: str, first: bool) -> bool:
    """Acronyms (AWS, S3), inner capitals (iPhone), or a capital mid-sentence (Paris)."""
    if len(token) < 2 or not token[0].isalpha() or token.startswith(("I'", "I\u2019")):
        return False  # "I'm", "I've": the pronoun, not a name
    if token.isupper() or any(c.isupper() for c in token[1:]):
        return True
    return token[0].isupper() and not first


def _starts_sentence(text: str, token: str) -> bool:
    index = text.find(token)
    before = text[:index].rstrip()
    return not before or before[-1] in ".?!:;\"'(\n"


def refusal(query: str, candidate: str) -> str:
    """Why `candidate` must not answer `query` ("polarity", "numbers", "entities"), or ""."""
    q, c = _features(query), _features(candidate)
    if q.negations % 2 != c.negations % 2:
        return "polarity"
    only_query, only_candidate = q.words - c.words, c.words - q.words
    if any((w, x) in _OPPOSITE for w in only_query for x in only_candidate):
        return "polarity"
    if q.numbers != c.numbers:
        return "numbers"
    # A name the other text lacks even in lower case ("PIN" matches "pin").
    if q.names - c.words or c.names - q.words:
        return "entities"
    return ""
