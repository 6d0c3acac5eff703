"""What to do when a provider call fails: retry it, wait how long, or skip the deployment.

Retries use exponential backoff with full jitter (AWS's "Exponential Backoff and
Jitter"): replicas that failed together do not retry together. A provider's
Retry-After is a floor, never shortened. A deployment that fails `failures` times in
a row is cooled down for `seconds`: calls skip it (to its fallbacks) instead of
hammering it; afterwards one trial call decides whether it is back. Which failures
are worth a retry is `services/providers/failures.py`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3  # per deployment, the first included
    base_seconds: float = 0.25
    max_seconds: float = 8.0

    def delay(self, attempt: int, asked: float | None, rng: random.Random) -> float:
        """The wait before retry number `attempt` (1 for the first retry)."""
        ceiling = min(self.max_seconds, self.base_seconds * 2 ** (attempt - 1))
        jittered = rng.uniform(0, ceiling)
        return jittered if asked is None else max(asked, jittered)


@dataclass
class _Health:
    failures: int = 0
    cold_until: float = 0.0
    cooled_for: float = 0.0  # the length of the last cool-down
    trial: bool = False  # a cooled-down deployment's one trial call is under way


@dataclass
class Cooldowns:
    """Per deployment: consecutive failures, and until when it is skipped.

    While cooling down it is half-open: one trial call at a time, the first after
    `first_seconds`, then each failed trial doubles the wait up to `seconds`, so a
    deployment that is back is found within `seconds` of its return (plus the trial
    call's own time: a trial that hangs holds the slot until its attempt times out)."""

    failures: int = 5
    seconds: float = 1.5
    clock: Callable[[], float] = time.monotonic
    first_seconds: float = 1.0
    _health: dict[str, _Health] = field(default_factory=dict)

    def available(self, model: str) -> bool:
        """False while cooling down; after that, True for one trial call at a time."""
        health = self._health.get(model)
        if health is None or health.failures < self.failures:
            return True
        if self.clock() < health.cold_until or health.trial:
            return False
        health.trial = True
        return True

    def failed(self, model: str) -> bool:
        """Count a failure; True when it (re)starts a cool-down. Only a failed trial
        call (or a failure once the cool-down is over) lengthens it: calls that were
        already in flight when the deployment went down fail together, and count once."""
        health = self._health.setdefault(model, _Health())
        health.failures += 1
        was_trial, health.trial = health.trial, False
        if health.failures < self.failures:
            return False
        now = self.clock()
        if now < health.cold_until and not was_trial:
            return False  # already cooling down
        longer = 2 * health.cooled_for if health.cooled_for else self.first_seconds
        health.cooled_for = min(longer, self.seconds)
        health.cold_until = now + health.cooled_for
        return True

    def cooled_for(self, model: str) -> float:
        """The length of the deployment's current (or last) cool-down, in seconds."""
        health = self._health.get(model)
        return health.cooled_for if health is not None else 0.0

    def succeeded(self, model: str) -> None:
        self._health.pop(model, None)

    def release(self, model: str) -> None:
        """A try that ended neither way (a bad request, a cancelled caller): a trial
        call it was lets the next one through."""
        health = self._health.get(model)
        if health is not None:
            health.trial = False

    def cooling(self) -> list[str]:
        now = self.clock()
        return sorted(m for m, h in self._health.items() if h.cold_until > now)
