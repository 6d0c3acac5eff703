"""The judges of a cheap answer: its self-rating tag, its log-probabilities, the bar."""

from __future__ import annotations

import math
import random

import pytest

from services.inference.escalation import (
    MIN_OBSERVED,
    Bar,
    EscalationThresholds,
    logprob_confidence,
    strip_rating,
)


@pytest.mark.parametrize(
    ("content", "shown", "rating"),
    [
        ("Nine to five.\n[CONFIDENCE: 8]", "Nine to five.", 0.8),
        ("Nine to five. [confidence:7/10]", "Nine to five.", 0.7),
        ("[CONFIDENCE: 2] Nine.\n[CONFIDENCE: 9]", "Nine.", 0.9),  # the last one counts
        ("Open [ CONFIDENCE : 6.5 ] at nine", "Open at nine", 0.65),
        ("Sure.\n[CONFIDENCE: 42]", "Sure.", 1.0),  # out of range: clamped
        ("No rating here [CONFIDENCE: high]", "No rating here [CONFIDENCE: high]", None),
        ("Plain answer", "Plain answer", None),
    ],
)
def test_the_rating_tag_is_read_and_always_removed(
    content: str, shown: str, rating: float | None
) -> None:
    assert strip_rating(content) == (shown, pytest.approx(rating) if rating else None)


def test_logprob_confidence_does_not_punish_long_answers() -> None:
    short, long = [-0.1] * 5, [-0.1] * 500

    assert logprob_confidence(short) == pytest.approx(math.exp(-0.1))
    assert logprob_confidence(long) == pytest.approx(logprob_confidence(short))
    assert logprob_confidence([]) is None


def test_without_a_target_the_fixed_threshold_is_the_bar() -> None:
    thresholds = EscalationThresholds()
    for _ in range(MIN_OBSERVED * 2):
        thresholds.observe("f", 1, 0.2)

    assert thresholds.bar("f", 1, 0.7, 0.0) == Bar(0.7)
    assert Bar(0.7).escalates(0.69, 0.99)
    assert not Bar(0.7).escalates(0.7, 0.0)
    assert Bar(0.7).escalates(None, 0.99)  # no rating, no confidence


def test_a_target_rate_is_met_even_when_ratings_are_whole_numbers() -> None:
    rng = random.Random(3)
    thresholds = EscalationThresholds()
    ratings = [rng.randint(4, 10) / 10 for _ in range(1000)]
    for rating in ratings[:MIN_OBSERVED]:
        thresholds.observe("f", 1, rating)
    escalated = 0
    for rating in ratings[MIN_OBSERVED:]:
        bar = thresholds.bar("f", 1, 0.7, 0.15)
        escalated += bar.escalates(rating, rng.random())
        thresholds.observe("f", 1, rating)

    assert escalated / (1000 - MIN_OBSERVED) == pytest.approx(0.15, abs=0.03)
