"""A ledger written by an older costmesh is upgraded in place, rows and money intact."""

# ruff: noqa: S608 - the SQL here is built from constants, never from input

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from services.ledger.rows import MIGRATIONS, ROLLUP_REBUILD, UsageRow
from services.ledger.stores import open_store
from tests.postgres import fresh_schema

V1_COLUMNS = (
    "request_id, trace_id, time_us, day, team, feature, model, provider, tier, input_tokens,"
    " cached_input_tokens, output_tokens, cache_outcome, escalated, batch, latency_ms, status,"
    " cost_nano_usd, price_version, client_request_id"
)
DAY = 1_764_115_200 * 1_000_000  # 2025-11-26T00:00Z
V1_ROWS = [
    (f"r{i}", "t", DAY + i, "2025-11-26", team, "f", "gpt-4o", "openai", 1, 100, 0, 20,
     outcome, 0, 0, 5, 1, cost, "v1", "")
    for i, (team, outcome, cost) in enumerate(
        [("support", 1, 450_000), ("support", 2, 0), ("search", 1, 1_250_000)]
    )
]  # fmt: skip


@contextmanager
def database_at(
    kind: str,
    tmp_path: Path,
    version: int,
    columns: str,
    rows: Sequence[tuple[object, ...]],
    *,
    rollup: bool,
) -> Iterator[str]:
    """A database as costmesh left it at schema `version`, holding `rows` (and, with
    `rollup`, their daily rollup, as the migration that made it would have built it)."""
    script = ";".join(MIGRATIONS[:version])
    insert = f"INSERT INTO usage ({columns}) VALUES ({', '.join(['?'] * len(rows[0]))})"
    if kind == "sqlite":
        path = tmp_path / "old.sqlite3"
        with sqlite3.connect(path) as db:
            db.executescript(f"{script}; PRAGMA user_version = {version};")
            db.executemany(insert, rows)
            if rollup:
                db.execute(ROLLUP_REBUILD)
        yield str(path)
        return
    with fresh_schema() as url, psycopg.connect(url) as db:
        for statement in filter(str.strip, script.split(";")):
            db.execute(statement)
        db.execute("CREATE TABLE costmesh_schema (version INTEGER NOT NULL)")
        db.execute("INSERT INTO costmesh_schema VALUES (%s)", (version,))
        with db.cursor() as cursor:
            cursor.executemany(insert.replace("?", "%s"), rows)
        if rollup:
            db.execute(ROLLUP_REBUILD)
        db.commit()
        yield url


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_version_one_is_upgraded_in_place_keeping_every_row(kind: str, tmp_path: Path) -> None:
    with database_at(kind, tmp_path, 1, V1_COLUMNS, V1_ROWS, rollup=False) as database:
        store = open_store(database, tmp_path)
        try:
            whole_day = {t.key: t for t in store.spend(("team",), DAY, DAY + 86_400_000_000)}
            partial = {t.key: t for t in store.spend(("team",), DAY, DAY + 2)}
            exported = [row for page in store.export(0, 2**62) for row in page]
            again = store.record([UsageRow(*V1_ROWS[0])])  # type: ignore[arg-type]
        finally:
            store.close()

    assert {k: (t.calls, t.cost_nano_usd, t.cached_calls) for k, t in whole_day.items()} == {
        "search": (1, 1_250_000, 0),
        "support": (2, 450_000, 1),
    }, "the rollup was built from the existing rows"
    assert whole_day["support"].counterfactual_cost_nano_usd == 450_000, "no savings invented"
    assert {k: t.calls for k, t in partial.items()} == {"support": 2}
    assert len(exported) == 3
    assert again == [(450_000, True)], "old request ids still deduplicate"


V2_COLUMNS = f"{V1_COLUMNS}, baseline_model, counterfactual_cost_nano_usd"
V2_ROW = (*V1_ROWS[0][:19], "client-1", "gpt-4o", 900_000)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_version_two_gains_purposes_keeping_its_row_and_its_call(kind: str, tmp_path: Path) -> None:
    whole_day = (DAY, DAY + 86_400_000_000)
    with database_at(kind, tmp_path, 2, V2_COLUMNS, [V2_ROW], rollup=True) as database:
        store = open_store(database, tmp_path)
        try:
            before = store.spend(("team",), *whole_day)
            (exported,) = [row for page in store.export(0, 2**62) for row in page]
            store.record(
                [replace(UsageRow(*V2_ROW), request_id="routing", purpose=3, p_complex=1.0)]  # type: ignore[arg-type]
            )
            after_rollup = store.spend(("team",), *whole_day)
            after_rows = store.spend(("team",), DAY, DAY + 86_400_000_000 - 1)
        finally:
            store.close()

    assert [(t.key, t.calls, t.cost_nano_usd) for t in before] == [("support", 1, 450_000)]
    assert before[0].counterfactual_cost_nano_usd == 900_000
    assert exported == UsageRow(*V2_ROW), "every old value kept; the new ones are defaults"  # type: ignore[arg-type]
    assert (exported.purpose, exported.route_reason, exported.p_simple) == (0, "", 0.0)
    assert isinstance(exported.p_complex, float)
    assert after_rollup == after_rows
    assert [(t.calls, t.cost_nano_usd) for t in after_rollup] == [(1, 900_000)], (
        "a routing row added its cost, not a call"
    )


V3_COLUMNS = f"{V2_COLUMNS}, purpose, route_reason, p_simple, p_moderate, p_complex"
V3_ROW = (*V2_ROW, 1, "short question", 0.75, 0.0, 0.25)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_version_three_gains_experiments_its_row_in_none(kind: str, tmp_path: Path) -> None:
    whole_day = (DAY, DAY + 86_400_000_000)
    with database_at(kind, tmp_path, 3, V3_COLUMNS, [V3_ROW], rollup=True) as database:
        store = open_store(database, tmp_path)
        try:
            (exported,) = [row for page in store.export(0, 2**62) for row in page]
            treated = replace(
                exported,
                request_id="new",
                cost_nano_usd=7,
                experiment="trial",
                arm=1,
                cache_source_request_id="r0",
            )
            store.record([treated])
            by_arm = store.spend(("arm",), *whole_day)
            by_team = store.spend(("team",), *whole_day)  # from the rollup
            trial = store.spend(("",), *whole_day, experiment="trial")
            trial_rows = [
                row for page in store.export(0, 2**62, experiment="trial") for row in page
            ]
        finally:
            store.close()

    assert exported == UsageRow(*V3_ROW), "every old value kept; the new ones are defaults"  # type: ignore[arg-type]
    assert (exported.experiment, exported.arm, exported.cache_source_request_id) == ("", 0, "")
    assert [(t.key, t.calls, t.cost_nano_usd) for t in by_arm] == [("0", 1, 450_000), ("1", 1, 7)]
    assert [(t.key, t.calls, t.cost_nano_usd) for t in by_team] == [("support", 2, 450_007)]
    assert [(t.calls, t.cost_nano_usd) for t in trial] == [(1, 7)]
    assert trial_rows == [treated]


V5_COLUMNS = f"{V3_COLUMNS}, experiment, arm, cache_source_request_id, route_out_of_domain"
V5_ROWS = [
    (*V3_ROW, "", 0, "", 1),  # an answer the router found out of domain
    ("r1", *V3_ROW[1:], "", 0, "", 0),  # an answer in its domain
    ("r2", *V3_ROW[1:-5], 3, "out of domain", 0.0, 0.0, 1.0, "", 0, "", 1),  # routing overhead
    ("r3", *V3_ROW[1:4], "search", *V3_ROW[5:], "", 0, "", 0),  # another team, in its domain
]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_version_five_counts_out_of_domain_calls_in_its_rollup(kind: str, tmp_path: Path) -> None:
    """The rollup migration 5 left has no out-of-domain count: migration 6 fills it from
    the rows, so a spend report read from the rollup says what the rows say."""
    whole_day = (DAY, DAY + 86_400_000_000)
    with database_at(kind, tmp_path, 5, V5_COLUMNS, V5_ROWS, rollup=True) as database:
        store = open_store(database, tmp_path)
        try:
            from_rollup = store.spend(("team",), *whole_day)
            from_rows = store.spend(("team",), DAY, DAY + 86_400_000_000 - 1)
            exported = {row.request_id: row for page in store.export(0, 2**62) for row in page}
        finally:
            store.close()

    # Two answers, one out of domain; the routing row, out of domain too, is no call.
    # (Calls are not compared: this test's rollup is built by migration 2's frozen rule,
    # which predates purposes.)
    assert [(t.key, t.out_of_domain_calls) for t in from_rollup] == [("search", 0), ("support", 1)]
    assert [(t.key, t.out_of_domain_calls) for t in from_rows] == [("search", 0), ("support", 1)]
    assert [exported[r].route_out_of_domain for r in ("r0", "r1", "r2", "r3")] == [
        True,
        False,
        True,
        False,
    ], "every row keeps its mark"
