"""Every ledger store test runs on SQLite and on the real PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.ledger.postgres_store import PostgresUsageStore
from services.ledger.rows import UsageStore
from services.ledger.stores import open_store
from tests.postgres import fresh_schema

OpenStore = Callable[[], UsageStore]


@pytest.fixture(params=["sqlite", "postgres"])
def open_ledger_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens a store on one database; call it again to reopen the same database."""
    opened: list[UsageStore] = []

    def opener(database: str) -> OpenStore:
        def open_one() -> UsageStore:
            opened.append(open_store(database, tmp_path))
            kind = "postgres" if isinstance(opened[-1], PostgresUsageStore) else "sqlite"
            assert kind == request.param, f"{database!r} opened a {kind} store"
            return opened[-1]

        return open_one

    if request.param == "sqlite":
        yield opener("ledger.sqlite3")
    else:
        with fresh_schema() as conninfo:
            yield opener(conninfo)
            for store in opened:
                store.close()
            opened.clear()
    for store in opened:
        store.close()
