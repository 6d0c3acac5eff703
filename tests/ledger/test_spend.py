"""Spend from the rollup plus the rows at a range's edges (or, by experiment or arm, from
the rows alone) equals a sum over every row, for every grouping, on both stores."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from services.ledger.rows import DAY_US, GROUPS, SpendTotal, UsageRow
from tests.ledger.conftest import OpenStore

START = 1_764_115_200 * 1_000_000 - 3 * DAY_US  # 2025-11-23T00:00Z, a Sunday
TEMPLATE = UsageRow(
    request_id="", trace_id="t", time_us=0, day="", team="", feature="", model="", provider="p",
    tier=0, input_tokens=0, cached_input_tokens=0, output_tokens=0, cache_outcome=1,
    escalated=False, batch=False, latency_ms=1, status=1, cost_nano_usd=0, price_version="v",
)  # fmt: skip


def _random_rows(rng: random.Random, count: int) -> list[UsageRow]:
    rows = []
    for i in range(count):
        time_us = START + rng.randrange(9 * DAY_US)  # nine days, across a week boundary
        cost = rng.randrange(10**12)
        experiment = rng.choice(["", "", "trial", "other"])
        rows.append(
            replace(
                TEMPLATE,
                request_id=f"r{i}",
                time_us=time_us,
                day=datetime.fromtimestamp(time_us / 1e6, UTC).strftime("%Y-%m-%d"),
                team=rng.choice(["support", "search", "billing"]),
                feature=rng.choice(["tickets", "faq"]),
                model=rng.choice(["gpt-4o", "gpt-4o-mini"]),
                tier=rng.randrange(4),
                input_tokens=rng.randrange(5000),
                output_tokens=rng.randrange(2000),
                cache_outcome=rng.choice([1, 2, 3]),
                escalated=rng.random() < 0.1,
                route_out_of_domain=rng.random() < 0.2,
                purpose=rng.choice([0, 1, 1, 2, 3, 4]),  # 2-4 are overhead, not calls
                cost_nano_usd=cost,
                counterfactual_cost_nano_usd=cost + rng.randrange(10**12),
                experiment=experiment,
                arm=rng.randrange(3) if experiment else 0,
            )
        )
    return rows


def _key(group: str, row: UsageRow) -> str:
    if group == "week":
        year, week, _ = datetime.strptime(row.day, "%Y-%m-%d").date().isocalendar()
        return f"{year}-W{week:02d}"
    if group == "month":
        return row.day[:7]
    return "" if group == "" else str(getattr(row, group))


def _brute_force(
    rows: list[UsageRow], groups: tuple[str, ...], start: int, end: int, **filters: str
) -> list[SpendTotal]:
    sums: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0] * 8)
    for row in rows:
        wanted = all(not value or getattr(row, name) == value for name, value in filters.items())
        if start <= row.time_us < end and wanted:
            total = sums[tuple(_key(g, row) for g in groups)]
            answer = int(row.purpose in (0, 1))
            for i, value in enumerate(
                (
                    answer, row.input_tokens, row.output_tokens, row.cost_nano_usd,
                    row.counterfactual_cost_nano_usd, answer * int(row.cache_outcome in (2, 3)),
                    answer * int(row.escalated), answer * int(row.route_out_of_domain),
                )
            ):  # fmt: skip
                total[i] += value
    return [SpendTotal(k, *v) for k, v in sorted(sums.items())]


@pytest.mark.parametrize("seed", [1, 2])
def test_every_grouping_over_any_range_matches_a_sum_over_every_row(
    open_ledger_store: OpenStore, seed: int
) -> None:
    rng = random.Random(seed)
    rows = _random_rows(rng, 400)
    store = open_ledger_store()
    store.record(rows[:200])
    store.record(rows[150:])  # overlapping: the repeats must not count twice
    day_edges = [START + d * DAY_US for d in range(10)]
    ranges = [(0, 2**62), (day_edges[1], day_edges[8])]
    for _ in range(6):
        a, b = sorted(START + rng.randrange(10 * DAY_US) for _ in range(2))
        ranges.append((a, b))

    groupings: list[tuple[str, ...]] = [(g,) for g in GROUPS]
    groupings += [("team", "feature"), ("month", "model"), ("tier", "week"), ("day", "team")]
    groupings += [("arm", "model"), ("week", "arm")]
    for start, end in ranges:
        for groups in groupings:
            filters = {
                "team": rng.choice(["", "support"]),
                "feature": rng.choice(["", "", "faq"]),
                "experiment": rng.choice(["", "", "trial"]),
            }
            got = store.spend(groups, start, end, **filters)
            want = _brute_force(rows, groups, start, end, **filters)
            assert got == want, (groups, start, end, filters)
