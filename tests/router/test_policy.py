"""The knob and the cheap-share target: which tier a set of probabilities gets."""

from __future__ import annotations

import random

import pytest

from services.router.policy import MIN_OBSERVED, CheapShare, cheap_score, choose_tier, raised


@pytest.mark.parametrize(
    ("probabilities", "threshold", "tier"),
    [
        ((0.9, 0.05, 0.05), 0.5, "simple"),
        ((0.4, 0.3, 0.3), 0.5, "moderate"),  # at most moderate: 0.7
        ((0.4, 0.3, 0.3), 0.8, "complex"),  # a stricter knob keeps it on complex
        ((0.2, 0.2, 0.6), 0.5, "complex"),
        ((0.5, 0.0, 0.5), 0.5, "simple"),  # reaching the threshold is enough
        ((0.0, 0.0, 1.0), 0.0, "simple"),  # a zero knob sends everything down
    ],
)
def test_the_cheapest_tier_whose_cumulative_probability_reaches_the_knob(
    probabilities: tuple[float, float, float], threshold: float, tier: str
) -> None:
    assert choose_tier(probabilities, threshold) == tier


def test_an_unfamiliar_question_must_be_surer_to_go_cheaper() -> None:
    # The probe: P(simple) 0.62 passes a 0.60 knob when nothing is unfamiliar.
    probabilities = (0.62, 0.09, 0.29)

    assert choose_tier(probabilities, 0.6) == "simple"
    assert choose_tier(probabilities, 0.6, unfamiliarity=0.46) == "complex"  # needs 0.78
    assert choose_tier((0.9, 0.05, 0.05), 0.6, unfamiliarity=0.46) == "simple"  # sure enough
    assert choose_tier((0.999, 0.0005, 0.0005), 0.6, unfamiliarity=1.0) == "complex"


@pytest.mark.parametrize(
    ("threshold", "unfamiliarity", "bar"),
    [(0.6, 0.0, 0.6), (0.6, 0.5, 0.8), (0.6, 1.0, 1.0), (0.6, 7.0, 1.0), (0.6, -1.0, 0.6)],
)
def test_the_knob_rises_linearly_to_one_with_unfamiliarity(
    threshold: float, unfamiliarity: float, bar: float
) -> None:
    assert raised(threshold, unfamiliarity) == pytest.approx(bar)


def test_without_a_target_the_knob_is_the_threshold() -> None:
    share = CheapShare(target=0.0, fallback=0.65)
    for _ in range(MIN_OBSERVED * 2):
        share.observe(0.1, "complex")

    assert share.threshold() == 0.65
    assert share.observed == 0.0


def test_a_target_share_is_met_on_traffic_like_the_recent_requests() -> None:
    rng = random.Random(7)
    share = CheapShare(target=0.7, fallback=0.5, window=2000)
    for _ in range(2000):  # scores skewed towards complex: the knob alone sends ~25% down
        score = rng.betavariate(2, 4)
        share.observe(score, choose_tier((score, 0.0, 1 - score), share.threshold()))
    warm = share.threshold()

    sent = 0
    for _ in range(2000):
        score = rng.betavariate(2, 4)
        tier = choose_tier((score, 0.0, 1 - score), share.threshold())
        share.observe(score, tier)
        sent += tier != "complex"

    assert warm < 0.5  # it had to lower the bar to meet the target
    assert sent / 2000 == pytest.approx(0.7, abs=0.04)
    assert share.observed == pytest.approx(0.7, abs=0.04)


def test_a_target_starts_from_the_prior_scores_before_traffic_arrives() -> None:
    prior = [i / 100 for i in range(101)]  # uniform held-out scores
    share = CheapShare(target=0.25, fallback=0.5, prior_scores=prior)

    assert share.threshold() == pytest.approx(0.75)


def test_cheap_score_is_the_probability_of_needing_less_than_complex() -> None:
    assert cheap_score((0.2, 0.3, 0.5)) == pytest.approx(0.5)
