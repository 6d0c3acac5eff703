"""A ledger written by an older costmesh is upgraded in place, rows and money intact."""

# ruff: noqa: S608 - the SQL here is built from constants, never from input

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from services.ledger.rows import MIGRATIONS, UsageRow
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
def version_one_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A database as costmesh left it at schema version 1, holding V1_ROWS."""
    marks = ", ".join(["?"] * 20)
    if kind == "sqlite":
        path = tmp_path / "old.sqlite3"
        with sqlite3.connect(path) as db:
            db.executescript(f"{MIGRATIONS[0]}; PRAGMA user_version = 1;")
            db.executemany(f"INSERT INTO usage ({V1_COLUMNS}) VALUES ({marks})", V1_ROWS)
        yield str(path)
        return
    with fresh_schema() as url, psycopg.connect(url) as db:
        for statement in filter(str.strip, MIGRATIONS[0].split(";")):
            db.execute(statement)
        db.execute("CREATE TABLE costmesh_schema (version INTEGER NOT NULL)")
        db.execute("INSERT INTO costmesh_schema VALUES (1)")
        with db.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO usage ({V1_COLUMNS}) VALUES ({marks.replace('?', '%s')})",
                V1_ROWS,
            )
        db.commit()
        yield url


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_version_one_is_upgraded_in_place_keeping_every_row(kind: str, tmp_path: Path) -> None:
    with version_one_database(kind, tmp_path) as database:
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
