"""Self-hosting and fine-tuning arithmetic, in exact decimals, for `costmesh economics`.

A month is 30 days (720 hours), as in the write-up the figures come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

HOURS_PER_MONTH = Decimal(720)
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600


@dataclass(frozen=True)
class SelfHostVerdict:
    gpus: int
    utilisation: Decimal  # share of the GPUs' capacity the traffic uses, 0..1
    self_host_usd_per_month: Decimal
    api_usd_per_month: Decimal
    # Requests per second above which one GPU's fixed cost beats the API.
    breakeven_requests_per_second: Decimal

    @property
    def api_over_self_host(self) -> Decimal:
        """How many times more the API costs; below 1 the API is cheaper."""
        return self.api_usd_per_month / self.self_host_usd_per_month


def self_host(
    gpu_usd_per_hour: Decimal,
    gpu_requests_per_second: Decimal,
    requests_per_second: Decimal,
    api_usd_per_request: Decimal,
) -> SelfHostVerdict:
    """Enough GPUs for the load, paid for every hour, against paying the API per request."""
    if min(gpu_usd_per_hour, gpu_requests_per_second, api_usd_per_request) <= 0:
        raise ValueError("GPU cost, GPU capacity and API price must be positive")
    if requests_per_second < 0:
        raise ValueError("requests per second must not be negative")
    gpus = max(1, math.ceil(requests_per_second / gpu_requests_per_second))
    return SelfHostVerdict(
        gpus=gpus,
        utilisation=requests_per_second / (gpus * gpu_requests_per_second),
        self_host_usd_per_month=gpus * gpu_usd_per_hour * HOURS_PER_MONTH,
        api_usd_per_month=requests_per_second * SECONDS_PER_MONTH * api_usd_per_request,
        breakeven_requests_per_second=gpu_usd_per_hour
        * HOURS_PER_MONTH
        / (SECONDS_PER_MONTH * api_usd_per_request),
    )


@dataclass(frozen=True)
class FineTuneVerdict:
    saving_usd_per_month: Decimal
    payback_days: Decimal | None  # None: it never pays back


def fine_tune(
    training_usd: Decimal, saving_usd_per_request: Decimal, requests_per_day: Decimal
) -> FineTuneVerdict:
    """A one-off training cost paid back by a per-request saving at a daily volume."""
    if training_usd < 0 or requests_per_day < 0:
        raise ValueError("training cost and volume must not be negative")
    daily = saving_usd_per_request * requests_per_day
    return FineTuneVerdict(
        saving_usd_per_month=daily * 30,
        payback_days=training_usd / daily if daily > 0 else None,
    )
