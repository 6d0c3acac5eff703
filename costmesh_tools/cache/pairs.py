"""Training triplets for the equivalence model: (question, same question reworded,
a question that looks alike but asks something else).

Positives are two questions of the same intent. Negatives are of two kinds:
- another intent's question, drawn from the intents nearest in meaning (the ones a
  general embedding confuses), so the model learns the boundaries that matter;
- a rule-made look-alike of the question itself: the opposite polarity, another
  number (amounts, dates and order numbers alike), another name, the roles of
  "from X to Y" swapped. Only the answer to the exact question is right for these,
  whatever their wording shares.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from costmesh_tools.cache.intents import Example

NEAREST_INTENTS = 3
RULE_SHARE = 0.15  # of triplets whose negative is a rule-made look-alike, where one applies

_NUMBER = re.compile(r"\d+")
_FROM_TO = re.compile(r"\bfrom (\w+) to (\w+)", re.IGNORECASE)
_FLIPS = (
    ("can't", "can"), ("cannot", "can"), ("isn't", "is"), ("doesn't", "does"),
    ("don't", "do"), ("didn't", "did"), ("wasn't", "was"), ("won't", "will"),
    ("haven't", "have"), ("hasn't", "has"), ("not", ""),
)  # fmt: skip
_NEGATABLE = re.compile(r"\b(can|is|does|do|did|was|will|have|has)\b", re.IGNORECASE)
_NAMES = (
    "Visa", "Mastercard", "Amex", "PayPal", "Apple Pay", "Google Pay", "Venmo", "Stripe",
    "Chrome", "Safari", "Firefox", "iPhone", "Android", "Windows", "Slack", "Zoom",
)  # fmt: skip


@dataclass(frozen=True)
class Triplet:
    anchor: str
    positive: str
    negative: str
    anchor_label: str
    negative_label: str  # a rule-made negative gets a label of its own


def rule_negative(text: str, rng: random.Random) -> tuple[str, str] | None:
    """(the question, a look-alike asking something else), or None when no rule applies."""
    rules = [
        rule
        for rule, applies in (
            (_other_number, bool(_NUMBER.search(text))),
            (_swapped_roles, bool(_FROM_TO.search(text))),
            (_other_name, any(n.lower() in text.lower() for n in _NAMES)),
            (_flipped_polarity, True),
        )
        if applies
    ]
    for rule in rules[:2]:
        made = rule(text, rng)
        if made is not None and made[0] != made[1]:
            return made
    return None


def _other_number(text: str, rng: random.Random) -> tuple[str, str]:
    """Another amount, date, or order number: the digits of an identifier change too."""
    match = rng.choice(list(_NUMBER.finditer(text)))
    digits = match.group()
    changed = str(int(digits) + rng.choice((1, 2, 5, 10, 100))).zfill(len(digits))
    return text, text[: match.start()] + changed + text[match.end() :]


def _swapped_roles(text: str, rng: random.Random) -> tuple[str, str] | None:
    match = _FROM_TO.search(text)
    if match is None or match.group(1).lower() == match.group(2).lower():
        return None
    swapped = f"from {match.group(2)} to {match.group(1)}"
    return text, text[: match.start()] + swapped + text[match.end() :]


def _other_name(text: str, rng: random.Random) -> tuple[str, str] | None:
    present = [n for n in _NAMES if n.lower() in text.lower()]
    name = rng.choice(present)
    other = rng.choice([n for n in _NAMES if n != name])
    return text, re.sub(re.escape(name), other, text, count=1, flags=re.IGNORECASE)


def _flipped_polarity(text: str, rng: random.Random) -> tuple[str, str] | None:
    for negative, positive in _FLIPS:
        pattern = re.compile(rf"\b{re.escape(negative)}\b", re.IGNORECASE)
        if pattern.search(text):
            flipped = pattern.sub(positive, text, count=1)
            return text, re.sub(r"\s{2,}", " ", flipped)
    match = _NEGATABLE.search(text)
    if match is None:
        return None
    word = match.group(1)
    negated = "cannot" if word.lower() == "can" else f"{word} not"
    return text, text[: match.start()] + negated + text[match.end() :]


def nearest_intents(
    examples: Sequence[Example], vectors: npt.NDArray[np.float32], k: int = NEAREST_INTENTS
) -> dict[str, list[str]]:
    """Each intent's k closest other intents, by the cosine of their centroids."""
    labels = sorted({e.label for e in examples})
    index = {label: i for i, label in enumerate(labels)}
    centroids = np.zeros((len(labels), vectors.shape[1]), dtype=np.float32)
    for example, vector in zip(examples, vectors, strict=True):
        centroids[index[example.label]] += vector
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    scores = centroids @ centroids.T
    np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1)[:, :k]
    return {label: [labels[j] for j in order[index[label]]] for label in labels}


def triplets(
    examples: Sequence[Example], neighbours: dict[str, list[str]], seed: int
) -> list[Triplet]:
    """One triplet per example with a second example of its intent, in a seeded order."""
    rng = random.Random(seed)
    by_label: dict[str, list[str]] = defaultdict(list)
    for e in examples:
        by_label[e.label].append(e.text)
    made = []
    for e in examples:
        same = [t for t in by_label[e.label] if t != e.text]
        if not same:
            continue
        positive = rng.choice(same)
        anchor = e.text
        rule = rule_negative(anchor, rng) if rng.random() < RULE_SHARE else None
        if rule is not None:
            anchor, negative = rule
            made.append(Triplet(anchor, positive, negative, e.label, f"rule:{negative}"))
            continue
        other = rng.choice(neighbours[e.label])
        made.append(Triplet(anchor, positive, rng.choice(by_label[other]), e.label, other))
    rng.shuffle(made)
    return made


def batches(made: Sequence[Triplet], size: int) -> list[list[Triplet]]:
    """Batches whose anchors have distinct intents: another anchor's positive is then
    a true negative for every anchor (in-batch negatives without false ones)."""
    pending = list(made)
    out: list[list[Triplet]] = []
    while pending:
        batch: list[Triplet] = []
        labels: set[str] = set()
        rest: list[Triplet] = []
        for t in pending:
            if len(batch) < size and t.anchor_label not in labels:
                batch.append(t)
                labels.add(t.anchor_label)
            else:
                rest.append(t)
        out.append(batch)
        pending = rest
    return out
