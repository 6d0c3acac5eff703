"""SQLite usage store, the embedded default: one file, no server."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from services.common.sqlite import open_database, transaction
from services.ledger.rows import MIGRATIONS, SpendTotal, UsageRow
from services.ledger.sql import Sql, rollup_increments

_SQL = Sql("?")


class SqliteUsageStore:
    """Thread-safe; callers on an event loop run its methods in a worker thread."""

    def __init__(self, path: str | Path) -> None:
        # FULL: once the ledger acknowledges a record the outbox deletes its copy, so
        # the acknowledgement must survive a power loss, not only a process crash.
        self._db = open_database(path, synchronous="FULL")
        self._lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        """Upgrade in place. The version is read inside the write transaction, so two
        processes starting on one old file upgrade it once, one after the other."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                version: int = self._db.execute("PRAGMA user_version").fetchone()[0]
                for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                    for statement in filter(str.strip, script.split(";")):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {number}")
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise OSError(f"cannot upgrade the ledger database: {exc}") from exc

    def record(self, rows: Sequence[UsageRow]) -> list[tuple[int, bool]]:
        results: list[tuple[int, bool]] = []
        with self._lock, transaction(self._db) as db:
            inserted = []
            for row in rows:
                if db.execute(_SQL.insert(), row.values()).rowcount == 1:
                    inserted.append(row)
                    results.append((row.cost_nano_usd, False))
                else:
                    existing = (row.team, row.request_id)
                    (cost,) = db.execute(_SQL.existing_cost(), existing).fetchone()
                    results.append((int(cost), True))
            for increment in rollup_increments(inserted):
                db.execute(_SQL.rollup_upsert(), increment)
        return results

    def spend(
        self,
        groups: tuple[str, ...],
        start_us: int,
        end_us: int,
        *,
        team: str = "",
        feature: str = "",
        experiment: str = "",
    ) -> list[SpendTotal]:
        return _SQL.spend(
            self._query, groups, start_us, end_us, team=team, feature=feature, experiment=experiment
        )

    def export(
        self, start_us: int, end_us: int, *, team: str = "", experiment: str = ""
    ) -> Iterator[list[UsageRow]]:
        return _SQL.export(self._query, start_us, end_us, team=team, experiment=experiment)

    def _query(self, sql: str, params: list[object]) -> list[Sequence[object]]:
        with self._lock:
            return list(self._db.execute(sql, params).fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()
