"""From tier probabilities to a tier: the cost/quality knob and the cheap-share target.

Tiers are ordered (simple < moderate < complex), so the router asks, cheapest tier
first, "how likely is it that this request needs at most this tier?". The first tier
whose cumulative probability reaches the threshold wins; complex always qualifies.
A higher threshold sends fewer requests down, and fewer complex ones by mistake. A
question near the edge of the classifier's training data (its unfamiliarity, 0..1)
raises the threshold toward 1 in proportion: uncertainty costs money, never quality.

A feature may instead state the share of its traffic it wants below complex. The
threshold then follows the score quantiles of its recent requests (as RouteLLM
calibrates to a strong-model share): with a window of recent cheap scores
P(simple) + P(moderate), the (1 - share) quantile is the score a request needs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from services.router.artefact import TIERS

# Recent requests whose scores set a cheap-share threshold, and how many are needed
# before they replace the prior (the artefact's held-out scores, or the fixed knob).
DEFAULT_WINDOW = 2000
MIN_OBSERVED = 200


def choose_tier(
    probabilities: Sequence[float], threshold: float, unfamiliarity: float = 0.0
) -> str:
    """The cheapest tier whose cumulative probability reaches the threshold, raised
    by the question's unfamiliarity."""
    threshold = raised(threshold, unfamiliarity)
    cumulative = 0.0
    for tier, probability in zip(TIERS[:-1], probabilities, strict=False):
        cumulative += probability
        if cumulative >= threshold:
            return tier
    return TIERS[-1]


def raised(threshold: float, unfamiliarity: float) -> float:
    """The threshold a question of this unfamiliarity must reach: the knob for a
    familiar one, 1 (only certainty goes cheaper) at the out-of-domain bar."""
    return threshold + (1.0 - threshold) * min(max(unfamiliarity, 0.0), 1.0)


def cheap_score(probabilities: Sequence[float]) -> float:
    """How likely the request is to need less than the complex tier."""
    return float(sum(probabilities[: len(TIERS) - 1]))


class CheapShare:
    """The threshold that sends a target share of recent traffic below complex, and
    the share actually sent there."""

    def __init__(
        self,
        target: float,
        fallback: float,
        prior_scores: Sequence[float] = (),
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self.target = target
        self._fallback = fallback
        self._prior = np.asarray(prior_scores, dtype=np.float64)
        self._scores: deque[float] = deque(maxlen=window)
        self._cheap: deque[bool] = deque(maxlen=window)

    def threshold(self) -> float:
        """The knob now in force: derived from recent scores when there is a target."""
        if not self.target:
            return self._fallback
        if len(self._scores) >= min(MIN_OBSERVED, self._scores.maxlen or MIN_OBSERVED):
            scores = np.fromiter(self._scores, dtype=np.float64)
        elif self._prior.size:
            scores = self._prior
        else:
            return self._fallback
        # A request at exactly the quantile goes cheap; the threshold never reaches
        # 0, where every request would, however sure the classifier is of complex.
        return float(max(np.quantile(scores, 1.0 - self.target), 1e-6))

    def observe(self, score: float, tier: str) -> None:
        self._scores.append(score)
        self._cheap.append(tier != TIERS[-1])

    @property
    def observed(self) -> float:
        """Share of recent requests sent below complex; 0 before any."""
        return sum(self._cheap) / len(self._cheap) if self._cheap else 0.0
