"""Confidence-based escalation: judge the cheap model's answer, replace it when unsure.

Two judges. A self-rating the model is asked to append ("[CONFIDENCE: N]", 0 to 10;
the tag never reaches the caller), or the answer's token log-probabilities. Their
sum grows with length, so long answers would look unsure: the judge is the geometric
mean token probability, exp(mean logprob), which does not.

Raw ratings are poorly calibrated, so a feature may give the share of answers it is
willing to escalate instead of a fixed threshold: the threshold is then that
quantile of the confidences of its recent answers.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from costmesh.types.v1 import types_pb2

CONFIDENCE_INSTRUCTION = (
    "After your answer, add one final line of the form [CONFIDENCE: N], where N is a "
    "whole number from 0 to 10 rating how likely it is that your answer is correct and "
    "complete."
)
# Room for the tag beyond the caller's max_tokens, so a full-length answer keeps it.
RATING_TOKENS = 8
_TAG = re.compile(r"[ \t]*\[\s*confidence\s*:\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]", re.IGNORECASE)
# Recent confidences per feature and method, and how many a target rate needs
# before it replaces the fixed threshold.
WINDOW = 1000
MIN_OBSERVED = 50


def ask_for_rating(messages: Sequence[types_pb2.ChatMessage]) -> list[types_pb2.ChatMessage]:
    """The conversation with the rating instruction added to its last user message.

    Not a system message of its own: many chat templates of OpenAI-compatible servers
    refuse a system message after the first turn. Everything before the last user
    message stays a prefix, so provider prompt caching still applies to it.
    """
    asked = list(messages)
    last = max(i for i, m in enumerate(asked) if m.role == types_pb2.ROLE_USER)
    asked[last] = types_pb2.ChatMessage(
        role=types_pb2.ROLE_USER, content=asked[last].content + "\n\n" + CONFIDENCE_INSTRUCTION
    )
    return asked


def strip_rating(content: str) -> tuple[str, float | None]:
    """The answer without any rating tag, and the last rating as 0..1 (None if absent)."""
    ratings = _TAG.findall(content)
    if not ratings:
        return content, None
    rating = min(max(float(ratings[-1]) / 10, 0.0), 1.0)
    return _TAG.sub("", content).strip(), rating


def logprob_confidence(token_logprobs: Sequence[float]) -> float | None:
    """Geometric mean probability of the answer's tokens; None without any."""
    if not token_logprobs:
        return None
    return math.exp(sum(token_logprobs) / len(token_logprobs))


@dataclass(frozen=True)
class Bar:
    """The confidence an answer needs: below `threshold` it escalates; exactly at it,
    with probability `at_threshold` (ratings are whole numbers: without this a 15%
    target over ratings 4..10 could only escalate 0% or 14%, or 29%)."""

    threshold: float
    at_threshold: float = 0.0

    def escalates(self, confidence: float | None, draw: float) -> bool:
        """`draw` is uniform in [0, 1): the tie-break for an answer at the bar."""
        if confidence is None:
            return True  # no rating is no confidence
        return confidence < self.threshold or (
            confidence == self.threshold and draw < self.at_threshold
        )


class EscalationThresholds:
    """The bar per feature and method, from a fixed threshold or a target rate."""

    def __init__(self, window: int = WINDOW) -> None:
        self._window = window
        self._recent: dict[tuple[str, int], deque[float]] = {}

    def bar(self, feature: str, method: int, fixed: float, target_rate: float) -> Bar:
        """With a target rate and enough history: the bar that escalated that share of
        the recent answers; otherwise the fixed threshold."""
        recent = self._recent.get((feature, method))
        if not target_rate or recent is None or len(recent) < MIN_OBSERVED:
            return Bar(fixed)
        scores = np.fromiter(recent, dtype=np.float64)
        threshold = float(np.quantile(scores, target_rate, method="inverted_cdf"))
        below = float(np.mean(scores < threshold))
        at = float(np.mean(scores == threshold))
        return Bar(threshold, min(max((target_rate - below) / at, 0.0), 1.0) if at else 0.0)

    def observe(self, feature: str, method: int, confidence: float) -> None:
        key = (feature, method)
        if key not in self._recent:
            self._recent[key] = deque(maxlen=self._window)
        self._recent[key].append(confidence)
