"""Logs a failing dependency once when it breaks and once when it recovers, not per call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class OutageLog:
    """At 10^2 requests a second a per-call warning buries everything else in the log;
    this reports the first failure, a reminder with the count every `every_seconds`,
    and the recovery."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        every_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._every = every_seconds
        self._clock = clock
        self._failures = 0
        self._last_report = 0.0

    def failed(self, detail: str) -> None:
        self._failures += 1
        now = self._clock()
        if self._failures == 1 or now - self._last_report >= self._every:
            self._log.warning(
                "%s failing (%s); %d failures so far", self._what, detail, self._failures
            )
            self._last_report = now

    def succeeded(self) -> None:
        if self._failures:
            self._log.info("%s recovered after %d failures", self._what, self._failures)
            self._failures = 0
