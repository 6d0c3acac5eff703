"""SQLite usage store: idempotent inserts by request id and grouped spend sums."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from services.common.sqlite import open_database

GROUPS = {"team": "team", "feature": "feature", "model": "model", "day": "day", "": "''"}

# Each entry upgrades the schema by one version (PRAGMA user_version), in place.
_MIGRATIONS = (
    """
    CREATE TABLE usage (
        request_id TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        time_us INTEGER NOT NULL,
        day TEXT NOT NULL,
        team TEXT NOT NULL,
        feature TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        tier INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cache_outcome INTEGER NOT NULL,
        escalated INTEGER NOT NULL,
        batch INTEGER NOT NULL,
        latency_ms INTEGER NOT NULL,
        status INTEGER NOT NULL,
        cost_nano_usd INTEGER NOT NULL,
        price_version TEXT NOT NULL,
        client_request_id TEXT NOT NULL,
        PRIMARY KEY (team, request_id)
    );
    CREATE INDEX usage_time ON usage (time_us);
    """,
)


@dataclass(frozen=True)
class UsageRow:
    """One call as stored; costs are integer nano-USD."""

    request_id: str
    trace_id: str
    time_us: int
    day: str
    team: str
    feature: str
    model: str
    provider: str
    tier: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cache_outcome: int
    escalated: bool
    batch: bool
    latency_ms: int
    status: int
    cost_nano_usd: int
    price_version: str
    client_request_id: str = ""


@dataclass(frozen=True)
class SpendTotal:
    key: str
    calls: int
    input_tokens: int
    output_tokens: int
    cost_nano_usd: int
    cached_calls: int


_COLUMNS = [f.name for f in fields(UsageRow)]


class SqliteUsageStore:
    """Thread-safe; callers on an event loop run its methods in a worker thread."""

    def __init__(self, path: str | Path) -> None:
        # FULL: once the ledger acknowledges a record the outbox deletes its copy, so
        # the acknowledgement must survive a power loss, not only a process crash.
        self._db = open_database(path, synchronous="FULL")
        self._lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version: int = self._db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                self._db.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")

    def record(self, rows: Sequence[UsageRow]) -> list[tuple[int, bool]]:
        """Insert rows; for each, the cost now on file and whether it was a repeat."""
        placeholders = ", ".join("?" for _ in _COLUMNS)
        insert = (
            f"INSERT INTO usage ({', '.join(_COLUMNS)}) VALUES ({placeholders}) "
            "ON CONFLICT (team, request_id) DO NOTHING"
        )
        results: list[tuple[int, bool]] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    inserted = self._db.execute(insert, astuple(row)).rowcount == 1
                    if inserted:
                        results.append((row.cost_nano_usd, False))
                    else:
                        (cost,) = self._db.execute(
                            "SELECT cost_nano_usd FROM usage WHERE team = ? AND request_id = ?",
                            (row.team, row.request_id),
                        ).fetchone()
                        results.append((cost, True))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return results

    def spend(
        self, group: str, start_us: int, end_us: int, team: str = "", feature: str = ""
    ) -> list[SpendTotal]:
        """Sums per group over [start_us, end_us), optionally for one team and feature."""
        key = GROUPS[group]
        where, params = self._where(start_us, end_us, team, feature)
        sql = (
            f"SELECT {key}, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost_nano_usd), "
            f"SUM(cache_outcome IN (2, 3)) FROM usage WHERE {where} GROUP BY 1 ORDER BY 1"
        )
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [SpendTotal(str(r[0]), r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def export(self, start_us: int, end_us: int, team: str = "") -> Iterator[list[UsageRow]]:
        """Pages of rows in time order, so a month never sits in memory at once."""
        where, params = self._where(start_us, end_us, team, "")
        last = (-1, "")
        while True:
            sql = (
                f"SELECT {', '.join(_COLUMNS)} FROM usage WHERE {where} "
                "AND (time_us, request_id) > (?, ?) ORDER BY time_us, request_id LIMIT 500"
            )
            with self._lock:
                page = self._db.execute(sql, [*params, *last]).fetchall()
            if not page:
                return
            yield [UsageRow(*values) for values in page]
            last = (page[-1][2], page[-1][0])

    @staticmethod
    def _where(start_us: int, end_us: int, team: str, feature: str) -> tuple[str, list[object]]:
        clauses = ["time_us >= ?", "time_us < ?"]
        params: list[object] = [start_us, end_us]
        for column, value in (("team", team), ("feature", feature)):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        return " AND ".join(clauses), params

    def close(self) -> None:
        with self._lock:
            self._db.close()
