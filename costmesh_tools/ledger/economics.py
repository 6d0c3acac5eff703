"""Self-hosting and fine-tuning arithmetic, in exact decimals, for `costmesh economics`.

A month is 30 days (720 hours), as in the write-up the figures come from. The price of
a request and the load can come from the ledger's own rows (`ledger_load`), so the
comparison is of what the mesh really pays, sized for its peak, with spares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

HOURS_PER_MONTH = Decimal(720)
NANO = Decimal(1_000_000_000)
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600


@dataclass(frozen=True)
class SelfHostVerdict:
    gpus: int  # serving the peak, plus the spares
    serving_gpus: int  # enough for the peak load alone
    utilisation: Decimal  # share of all the GPUs' capacity the mean load uses, 0..1
    self_host_usd_per_month: Decimal  # GPUs every hour, plus operations
    api_usd_per_month: Decimal
    # The mean load from which the API costs at least what self-hosting it would, with
    # the GPUs that load's peak needs (same peak-to-mean ratio, same spares and
    # operations): below it the API is cheaper.
    breakeven_requests_per_second: Decimal | None  # None: the API is cheaper at any load
    breakeven_gpus: int | None

    @property
    def api_over_self_host(self) -> Decimal:
        """How many times more the API costs; below 1 the API is cheaper."""
        return self.api_usd_per_month / self.self_host_usd_per_month


def self_host(
    gpu_usd_per_hour: Decimal,
    gpu_requests_per_second: Decimal,
    requests_per_second: Decimal,
    api_usd_per_request: Decimal,
    *,
    peak_requests_per_second: Decimal | None = None,
    spare_gpus: int = 0,
    ops_usd_per_month: Decimal = Decimal(0),
) -> SelfHostVerdict:
    """GPUs for the peak load (the mean when no peak is given) plus `spare_gpus` (N+1:
    one), paid every hour with the operations cost, against paying the API per request
    at the mean load."""
    if min(gpu_usd_per_hour, gpu_requests_per_second, api_usd_per_request) <= 0:
        raise ValueError("GPU cost, GPU capacity and API price must be positive")
    peak = requests_per_second if peak_requests_per_second is None else peak_requests_per_second
    if requests_per_second < 0 or peak < requests_per_second:
        raise ValueError("requests per second must not be negative, nor the peak below the mean")
    if spare_gpus < 0 or ops_usd_per_month < 0:
        raise ValueError("spare GPUs and the operations cost must not be negative")

    def monthly(serving: int) -> Decimal:
        return (serving + spare_gpus) * gpu_usd_per_hour * HOURS_PER_MONTH + ops_usd_per_month

    serving = max(1, math.ceil(peak / gpu_requests_per_second))
    ratio = peak / requests_per_second if requests_per_second > 0 else Decimal(1)
    mean_per_gpu = gpu_requests_per_second / ratio
    api_per_rps_month = SECONDS_PER_MONTH * api_usd_per_request
    breakeven: tuple[Decimal, int] | None = None
    # Only if a GPU's worth of traffic costs more on the API than the GPU does can the
    # line ever catch up with the steps.
    if mean_per_gpu * api_per_rps_month > gpu_usd_per_hour * HOURS_PER_MONTH:
        breakeven = _breakeven(monthly, mean_per_gpu, api_per_rps_month)
    return SelfHostVerdict(
        gpus=serving + spare_gpus,
        serving_gpus=serving,
        utilisation=requests_per_second / ((serving + spare_gpus) * gpu_requests_per_second),
        self_host_usd_per_month=monthly(serving),
        api_usd_per_month=requests_per_second * SECONDS_PER_MONTH * api_usd_per_request,
        breakeven_requests_per_second=None if breakeven is None else breakeven[0],
        breakeven_gpus=None if breakeven is None else breakeven[1] + spare_gpus,
    )


def _breakeven(
    monthly: Callable[[int], Decimal], mean_per_gpu: Decimal, api_per_rps_month: Decimal
) -> tuple[Decimal, int]:
    """Self-hosting costs a step function of the load (one more GPU every
    `mean_per_gpu` requests a second), the API a straight line: the first load where
    the line reaches the step it is on, and that step's GPU count."""
    serving = 1
    while True:
        load = monthly(serving) / api_per_rps_month
        if load <= serving * mean_per_gpu:
            return load, serving
        serving += 1


@dataclass(frozen=True)
class LedgerLoad:
    """What the ledger says a feature's traffic costs and how it arrives."""

    requests: int  # answered requests
    cost_usd: Decimal  # every row's cost: answers and what was paid on the way
    seconds: Decimal  # the period the rows were read over
    peak_requests_per_second: Decimal  # the chosen percentile of per-minute rates

    @property
    def api_usd_per_request(self) -> Decimal:
        return self.cost_usd / self.requests

    @property
    def requests_per_second(self) -> Decimal:
        return Decimal(self.requests) / self.seconds


def ledger_load(
    answers_at_us: Sequence[int],
    cost_nano_usd: int,
    start_us: int,
    end_us: int,
    percentile: Decimal,
) -> LedgerLoad:
    """From the answer rows' times (microseconds) and all rows' cost over [start, end):
    the price of a request and the mean and peak load. The peak is `percentile` of the
    requests per second of each minute of the period, empty minutes included (and at
    least the mean)."""
    if not answers_at_us:
        raise ValueError("no answered requests in the period: nothing to price")
    if not 0 < percentile <= 100:
        raise ValueError("the peak percentile must be in (0, 100]")
    minutes = max(1, math.ceil((end_us - start_us) / 60_000_000))
    per_minute = [0] * minutes
    for at in answers_at_us:
        per_minute[min(max((at - start_us) // 60_000_000, 0), minutes - 1)] += 1
    per_minute.sort()
    rank = max(0, math.ceil(float(percentile) / 100 * minutes) - 1)  # nearest rank
    seconds = Decimal(max(end_us - start_us, 1)) / 1_000_000
    mean = Decimal(len(answers_at_us)) / seconds
    return LedgerLoad(
        requests=len(answers_at_us),
        cost_usd=Decimal(cost_nano_usd) / NANO,
        seconds=seconds,
        # Never below the mean: sparse traffic has quiet minutes at most percentiles.
        peak_requests_per_second=max(Decimal(per_minute[rank]) / 60, mean),
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
