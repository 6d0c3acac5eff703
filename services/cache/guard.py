"""A second look at a semantic candidate before it is served.

Embeddings place "is port 6379 open?" next to "is port 6379 closed?" and "refund
of $20" next to "refund of $200". The guard refuses a candidate that differs from
the query in:

- identifiers (references, emails): a token of letters and digits, or an address,
  must be the same on both sides: "ref-abc123a" is not "ref-abc123b";
- numbers, amounts, order numbers and dates, in digits or words ("four" is 4;
  months and weekdays name dates too);
- polarity: a negation whose scope the other text asks about un-negated ("why
  wasn't my transfer approved" against "why was my transfer approved"), or an
  opposite word ("enable" against "disable"). An incidental negation ("I can't log
  in, how do I reset my password?") says nothing the other text contradicts;
- names, when both texts name something and the names differ ("Apple Pay" against
  "Google Pay"). An acronym or a name only one side spells out ("SSO" against
  "single sign-on") is the equivalence model's call.

It is lexical and cheap (tens of microseconds) and only ever turns a hit into a
miss: its cost is a lost hit, never a wrong answer. `costmesh cache eval` measures
both sides of that trade.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_APOSTROPHES = str.maketrans("", "", "'\u2019")
_WORD = re.compile(
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"  # an email address
    r"|[A-Za-z0-9]+(?:[-_/#.:,][A-Za-z0-9]+)*"  # a word, number or identifier
    r"(?:['\u2019][A-Za-z]+)?"  # a contraction's tail: don't, it's
)
_DIGIT = re.compile(r"\d")
_LETTER = re.compile(r"[a-z]")
_SEPARATORS = re.compile(r"[,]")

_NEGATIONS = frozenset(
    {
        "not", "no", "never", "cannot", "cant", "without", "nothing", "none", "nobody",
        "neither", "nor", "unable", "didnt", "doesnt", "dont",
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
    ("install", "uninstall"), ("join", "leave"), ("win", "lose"), ("next", "last"),
    ("next", "previous"), ("pause", "resume"),
    # Whose: "change my name" is not "change your name" (measured: clinc150).
    ("my", "your"), ("me", "you"), ("mine", "yours"), ("myself", "yourself"),
)  # fmt: skip
# "set a four minute timer" names the same number as "set a 4 minute timer". "One" is
# left out: "get a new one" names no number.
_SMALL_NUMBERS = (
    "zero", "", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
)  # fmt: skip
_NUMBER_WORDS = {word: str(value) for value, word in enumerate(_SMALL_NUMBERS) if word} | {
    "thirty": "30", "forty": "40", "fifty": "50", "hundred": "100", "thousand": "1000",
    "million": "1000000", "half": "0.5", "twice": "2", "double": "2",
}  # fmt: skip
# A date named in words is a number too: "due in March" is not "due in April".
_DATE_WORDS = frozenset(
    {
        "january", "february", "march", "april", "may", "june", "july", "august",
        "september", "october", "november", "december", "jan", "feb", "mar", "apr", "jun",
        "jul", "aug", "sep", "sept", "oct", "nov", "dec", "monday", "tuesday", "wednesday",
        "thursday", "friday", "saturday", "sunday", "today", "tomorrow", "yesterday",
        "tonight", "weekend", "week", "month", "year", "weekly", "monthly", "yearly",
        "annual", "annually", "daily", "hourly",
    }
)  # fmt: skip
# Words a negation reaches past to the word it negates: "didn't get my card" negates
# "get", "not a valid card" negates "valid".
_FILLER = frozenset(
    {
        "a", "an", "the", "my", "your", "our", "their", "his", "her", "its", "this", "that",
        "be", "been", "being", "is", "are", "was", "were", "am", "do", "does", "did", "have",
        "has", "had", "i", "you", "we", "they", "it", "he", "she", "me", "us", "them", "to",
        "any", "yet", "even", "really", "just", "still", "so", "very", "too", "able", "get",
        "got", "can", "could", "will", "would", "should", "seem", "seems",
    }
)  # fmt: skip
_SCOPE = 4  # tokens after a negation searched for the word it negates
# "From annual to monthly" is not "from monthly to annual".
_DIRECTION = re.compile(r"(\w+) (?:to|into|->) (\w+)")
_OPPOSITE = frozenset(_OPPOSITES) | frozenset((b, a) for a, b in _OPPOSITES)


@dataclass(frozen=True)
class _Features:
    words: frozenset[str]
    stems: frozenset[str]
    negated: frozenset[str]  # the stems of the words a negation applies to
    numbers: frozenset[str]
    identifiers: frozenset[str]
    names: frozenset[str]


@functools.lru_cache(maxsize=16384)
def _features(text: str) -> _Features:
    """Cached: a look-up judges one question against up to four stored ones, and the
    same stored questions come up again and again."""
    tokens = _WORD.findall(text)
    plain = [t.lower().translate(_APOSTROPHES) for t in tokens]
    identifiers = frozenset(
        w for w in plain if "@" in w or (_DIGIT.search(w) and _LETTER.search(w))
    )
    numbers = frozenset(
        {_SEPARATORS.sub("", w) for w in plain if _DIGIT.search(w) and not _LETTER.search(w)}
        | {_NUMBER_WORDS[w] for w in plain if w in _NUMBER_WORDS}
        | {w for w in plain if w in _DATE_WORDS}
    )
    shouting = text.isupper()  # all capitals say nothing about names
    names = frozenset(
        t.lower()
        for i, t in enumerate(tokens)
        if not shouting and _looks_like_name(t, first=i == 0 or _starts_sentence(text, t))
    )
    stems = frozenset(_stem(w) for w in plain)
    return _Features(frozenset(plain), stems, _negated(tokens, plain), numbers, identifiers, names)


def _stem(word: str) -> str:
    """Enough of a stem that "received" and "receive", "working" and "works" meet."""
    for suffix in ("ing", "ed", "es", "e", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _negated(tokens: list[str], plain: list[str]) -> frozenset[str]:
    """The word each negation applies to: the first word after it that is not filler.
    "Approved yet or not" asks a question, it negates nothing."""
    negated = set()
    for i, (token, word) in enumerate(zip(tokens, plain, strict=True)):
        is_negation = word in _NEGATIONS or token.lower().endswith(("n't", "n\u2019t"))
        if not is_negation or (word == "not" and i > 0 and plain[i - 1] == "or"):
            continue
        scope = [w for w in plain[i + 1 : i + 1 + _SCOPE] if w not in _FILLER]
        negated.add(_stem(scope[0] if scope else word))
    return frozenset(negated)


def _looks_like_name(token: str, first: bool) -> bool:
    """Inner capitals (PayPal, iPhone) or a capital mid-sentence (Paris). Acronyms
    (SSO, SAML) are not names here: they stand for words the other side may spell out."""
    if len(token) < 2 or not token[0].isalpha() or token.startswith(("I'", "I\u2019")):
        return False  # "I'm", "I've": the pronoun, not a name
    if token.isupper() or _DIGIT.search(token):
        return False
    if any(c.isupper() for c in token[1:]):
        return True
    return token[0].isupper() and not first


def _starts_sentence(text: str, token: str) -> bool:
    index = text.find(token)
    before = text[:index].rstrip()
    return not before or before[-1] in ".?!:;\"'(\n"


def _swapped(query: str, candidate: str) -> bool:
    """The same two words on either side of "to", in the other order."""
    pairs = {(a.lower(), b.lower()) for a, b in _DIRECTION.findall(query)}
    return any((b.lower(), a.lower()) in pairs for a, b in _DIRECTION.findall(candidate))


def refusal(query: str, candidate: str) -> str:
    """Why `candidate` must not answer `query` ("identifiers", "numbers", "polarity",
    "entities"), or ""."""
    q, c = _features(query), _features(candidate)
    if q.identifiers != c.identifiers:
        return "identifiers"
    if q.numbers != c.numbers:
        return "numbers"
    if _opposed(q, c) or _swapped(query, candidate):
        return "polarity"
    # Both name something, and each names what the other lacks even in lower case.
    if q.names - c.words and c.names - q.words:
        return "entities"
    return ""


def _opposed(q: _Features, c: _Features) -> bool:
    """Negated on one side and asked about un-negated on the other, or an opposite
    word on each side."""
    if (q.negated - c.negated) & c.stems or (c.negated - q.negated) & q.stems:
        return True
    only_query, only_candidate = q.words - c.words, c.words - q.words
    return any((w, x) in _OPPOSITE for w in only_query for x in only_candidate)
