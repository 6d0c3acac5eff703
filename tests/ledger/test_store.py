"""The usage stores (SQLite and PostgreSQL): idempotent, exact sums, in-place upgrades."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from services.ledger.rows import UsageRow
from tests.ledger.conftest import OpenStore

DAY_US = 86_400 * 1_000_000
BASE = UsageRow(
    request_id="r0",
    trace_id="t",
    time_us=1_764_115_200 * 1_000_000,
    day="2025-11-26",
    team="support",
    feature="tickets",
    model="gpt-4o-mini",
    provider="openai",
    tier=1,
    input_tokens=100,
    cached_input_tokens=0,
    output_tokens=20,
    cache_outcome=1,
    escalated=False,
    batch=False,
    latency_ms=12,
    status=1,
    cost_nano_usd=27_000,
    price_version="v1",
)


def test_a_repeated_request_id_is_ignored_and_reports_the_first_cost(
    open_ledger_store: OpenStore,
) -> None:
    store = open_ledger_store()
    first = store.record([BASE])
    again = store.record([replace(BASE, cost_nano_usd=999)])

    assert first == [(27_000, False)]
    assert again == [(27_000, True)]
    assert store.spend(("",), 0, 2**62)[0].calls == 1


def test_spend_groups_sum_exactly_and_respect_the_time_range(open_ledger_store: OpenStore) -> None:
    store = open_ledger_store()
    rows = [
        replace(BASE, request_id="a", team="support", cost_nano_usd=1),
        replace(BASE, request_id="b", team="support", cost_nano_usd=2, cache_outcome=2),
        replace(BASE, request_id="c", team="search", cost_nano_usd=4),
        replace(
            BASE,
            request_id="d",
            team="search",
            cost_nano_usd=8,
            time_us=BASE.time_us + DAY_US,
            day="2025-11-27",
        ),
    ]
    store.record(rows)

    by_team = {
        t.key: (t.calls, t.cost_nano_usd, t.cached_calls) for t in store.spend(("team",), 0, 2**62)
    }
    first_day = store.spend(("day",), BASE.time_us, BASE.time_us + DAY_US)
    only_search = store.spend(("",), 0, 2**62, team="search")

    assert by_team == {"search": (2, 12, 0), "support": (2, 3, 1)}
    assert [(t.key, t.cost_nano_usd) for t in first_day] == [("2025-11-26", 7)]
    assert only_search[0].cost_nano_usd == 12


def test_export_pages_through_every_row_in_time_order(open_ledger_store: OpenStore) -> None:
    store = open_ledger_store()
    rows = [replace(BASE, request_id=f"r{i:04}", time_us=BASE.time_us + i) for i in range(1203)]
    store.record(list(reversed(rows)))

    exported = [row for page in store.export(0, 2**62) for row in page]

    assert [r.request_id for r in exported] == [r.request_id for r in rows]


def test_reopening_keeps_rows(open_ledger_store: OpenStore) -> None:
    open_ledger_store().record([BASE])
    reopened = open_ledger_store()

    assert reopened.spend(("",), 0, 2**62)[0].calls == 1
    assert reopened.record([BASE]) == [(27_000, True)]


def test_money_beyond_32_bits_sums_exactly(open_ledger_store: OpenStore) -> None:
    store = open_ledger_store()
    big = 9_007_199_254_740_993  # 2**53 + 1: lost by any float on the way
    store.record([replace(BASE, request_id="a", cost_nano_usd=big), replace(BASE, request_id="b")])

    (total,) = store.spend(("",), 0, 2**62)

    assert total.cost_nano_usd == big + BASE.cost_nano_usd
    assert isinstance(total.cost_nano_usd, int)


def test_concurrent_writers_sharing_rollup_keys_neither_deadlock_nor_drift(
    open_ledger_store: OpenStore,
) -> None:
    writers = [open_ledger_store(), open_ledger_store()]  # two ledger replicas
    features = ["tickets", "faq", "triage", "drafts", "search"]
    batches = [
        [
            replace(BASE, request_id=f"w{w}-b{b}-{f}", feature=f, cost_nano_usd=1000 + b)
            for f in (features if w == 0 else list(reversed(features)))
        ]
        for w in range(2)
        for b in range(15)
    ]

    def write(index: int) -> None:
        writers[index % 2].record(batches[index])

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, range(len(batches))))  # raises if any writer failed

    day = BASE.time_us - BASE.time_us % (86_400 * 1_000_000)
    from_rollup = writers[0].spend(("feature",), day, day + 86_400 * 1_000_000)
    from_rows = writers[0].spend(("feature",), day, day + 86_400 * 1_000_000 - 1)
    assert from_rollup == from_rows
    assert sum(t.calls for t in from_rollup) == 150


def test_a_request_id_repeated_within_one_batch_counts_once(open_ledger_store: OpenStore) -> None:
    store = open_ledger_store()
    other = replace(BASE, request_id="other", cost_nano_usd=5)

    results = store.record([BASE, other, replace(BASE, cost_nano_usd=1)])

    assert results == [(27_000, False), (5, False), (27_000, True)]
    assert store.spend(("",), 0, 2**62)[0].calls == 2


def test_export_of_one_experiment_pages_through_its_rows_only(
    open_ledger_store: OpenStore,
) -> None:
    store = open_ledger_store()
    rows = [
        replace(BASE, request_id=f"r{i:04}", time_us=BASE.time_us + i // 2,
                experiment="trial" if i % 3 else "", arm=1 + i % 2 if i % 3 else 0)
        for i in range(1503)
    ]  # fmt: skip
    store.record(list(reversed(rows)))

    exported = [row for page in store.export(0, 2**62, experiment="trial") for row in page]
    other_team = [
        row for page in store.export(0, 2**62, team="search", experiment="trial") for row in page
    ]

    assert exported == [r for r in rows if r.experiment == "trial"], "all 1,002, in time order"
    assert other_team == []
