"""PostgreSQL usage store, for scale: a connection pool, the same behaviour as SQLite."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import errors
from psycopg_pool import ConnectionPool

from services.ledger.rows import MIGRATIONS, SpendTotal, UsageRow
from services.ledger.sql import Sql, rollup_increments

_SQL = Sql("%s")
_ATTEMPTS = 3
# Serialises migrations when several ledger replicas start at once.
_MIGRATION_LOCK = 0x636F73746D657368  # "costmesh"


class PostgresUsageStore:
    """Thread-safe through its pool; callers on an event loop use a worker thread."""

    def __init__(self, conninfo: str, max_size: int = 8) -> None:
        self._pool = ConnectionPool(conninfo, min_size=1, max_size=max_size, open=False)
        try:
            self._pool.open(wait=True, timeout=10)
        except Exception as exc:
            self._pool.close()
            raise OSError(f"cannot connect to the ledger database: {exc}") from exc
        self._migrate()

    def _migrate(self) -> None:
        try:
            self._migrate_locked()
        except psycopg.Error as exc:
            raise OSError(f"cannot upgrade the ledger database: {exc}") from exc

    def _migrate_locked(self) -> None:
        with self._pool.connection() as db, db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS costmesh_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM costmesh_schema").fetchone()
            version = 0 if row is None else int(row[0])
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute("DELETE FROM costmesh_schema")
                db.execute("INSERT INTO costmesh_schema VALUES (%s)", (number,))

    def record(self, rows: Sequence[UsageRow]) -> list[tuple[int, bool]]:
        for attempt in range(_ATTEMPTS):
            try:
                return self._record_once(rows)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _record_once(self, rows: Sequence[UsageRow]) -> list[tuple[int, bool]]:
        """Rows in key order, then one rollup upsert per key in key order: writers
        sharing keys lock them in the same order, so they wait instead of deadlocking.
        Statements go out pipelined (executemany), not one round trip each."""
        order = sorted(range(len(rows)), key=lambda i: (rows[i].team, rows[i].request_id))
        results: list[tuple[int, bool]] = [(0, False)] * len(rows)
        with self._pool.connection() as db, db.transaction(), db.cursor() as cursor:
            cursor.executemany(
                _SQL.insert() + " RETURNING team, request_id",
                [rows[i].values() for i in order],
                returning=True,
            )
            fresh: set[tuple[str, str]] = set()
            while True:
                fresh.update((str(t), str(r)) for t, r in cursor.fetchall())
                if not cursor.nextset():
                    break
            inserted, repeats = [], []
            for i in order:
                key = (rows[i].team, rows[i].request_id)
                if key in fresh:
                    fresh.discard(key)  # a later copy in this batch is a repeat
                    inserted.append(rows[i])
                    results[i] = (rows[i].cost_nano_usd, False)
                else:
                    repeats.append(i)
            if repeats:
                costs = self._existing_costs(cursor, [rows[i] for i in repeats])
                for i in repeats:
                    results[i] = (costs[(rows[i].team, rows[i].request_id)], True)
            cursor.executemany(_SQL.rollup_upsert(), rollup_increments(inserted))
        return results

    @staticmethod
    def _existing_costs(
        cursor: psycopg.Cursor[Any], repeats: Sequence[UsageRow]
    ) -> dict[tuple[str, str], int]:
        cursor.execute(
            "SELECT team, request_id, cost_nano_usd FROM usage WHERE (team, request_id) IN"
            " (SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([r.team for r in repeats], [r.request_id for r in repeats]),
        )
        return {(str(t), str(r)): int(c) for t, r, c in cursor.fetchall()}

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
        with self._pool.connection() as db:
            return list(db.execute(sql, params).fetchall())

    def close(self) -> None:
        self._pool.close()
