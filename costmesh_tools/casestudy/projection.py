"""What a measured cost comes to per day and per month at a given traffic volume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from google.protobuf.timestamp_pb2 import Timestamp

DAYS_PER_MONTH = 30  # as in the write-up the figures come from
_SECONDS_PER_DAY = Decimal(86_400)


@dataclass(frozen=True)
class Projection:
    """The daily volume projections are made for (None: none can be), and its source."""

    requests_per_day: Decimal | None
    basis: str

    @classmethod
    def of(
        cls,
        given: Decimal | float | None,
        answers: int,
        times: Sequence[Timestamp],
        basis: str = "",
    ) -> Projection:
        """`given` requests per day (`basis`: where that volume came from; empty: given
        by the user); without it, `answers` over the time `times` span."""
        if given is not None:
            value = given if isinstance(given, Decimal) else Decimal(str(given))
            if not value.is_finite() or value < 0:
                raise ValueError(f"requests per day must be a non-negative number, got {given}")
            return cls(value, basis or "requests per day given for the workload")
        seconds = [Decimal(t.seconds) + Decimal(t.nanos) / 10**9 for t in times]
        span = max(seconds, default=Decimal(0)) - min(seconds, default=Decimal(0))
        if span <= 0:
            return cls(None, "no projection: the rows span no time and no daily volume was given")
        return cls(
            answers * _SECONDS_PER_DAY / span,
            f"requests per day from {answers} answers over the {span / 3600:.2f} hours "
            "the rows span",
        )

    def daily(self, cost_nano_usd: int, requests: int) -> int | None:
        """Nano-USD a day: `cost_nano_usd`, measured over `requests`, at the daily volume."""
        return self._scaled(cost_nano_usd, requests, 1)

    def monthly(self, cost_nano_usd: int, requests: int) -> int | None:
        return self._scaled(cost_nano_usd, requests, DAYS_PER_MONTH)

    def _scaled(self, cost_nano_usd: int, requests: int, days: int) -> int | None:
        if self.requests_per_day is None or requests == 0:
            return None
        value = cost_nano_usd * self.requests_per_day * days / requests
        return int(value.to_integral_value(rounding=ROUND_HALF_EVEN))
