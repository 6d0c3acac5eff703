"""The outbox's SQLite file: usage records waiting for the ledger, and the dead letters
it will never take. Thread-safe; callers on an event loop use a worker thread."""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from costmesh.ledger.v1 import ledger_pb2
from services.common.sqlite import open_database, transaction

# A write of the caller's own that must commit with its records or not at all.
AlsoWrite = Callable[[sqlite3.Connection], None]


_OPEN: weakref.WeakSet[OutboxFile] = weakref.WeakSet()


def _backlog(options: CallbackOptions) -> Iterable[Observation]:
    yield Observation(sum(file.count() for file in list(_OPEN)))


metrics.get_meter("costmesh.inference").create_observable_gauge(
    "costmesh.outbox.pending",
    callbacks=[_backlog],
    unit="{record}",
    description="Usage rows written but not yet acknowledged by the ledger",
)


@dataclass(frozen=True)
class Insert:
    """One caller's records, and its own write to commit with them."""

    records: Sequence[ledger_pb2.UsageRecord]
    also: AlsoWrite | None


class OutboxFile:
    def __init__(self, path: Path) -> None:
        # NORMAL: survives a killed process (the failure the outbox is for) without an
        # fsync per call; only an OS crash or power loss can drop the last commits.
        self.path = path
        self._db = open_database(path)
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS outbox (team TEXT NOT NULL, request_id TEXT NOT NULL,"
            " record BLOB NOT NULL, PRIMARY KEY (team, request_id));"
            "CREATE TABLE IF NOT EXISTS dead_letter (team TEXT NOT NULL, request_id TEXT NOT NULL,"
            " record BLOB NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (team, request_id));"
        )
        self._lock = threading.Lock()
        self._closed = False
        _OPEN.add(self)  # whole: a metrics collection may count it from now on

    def put_all(self, inserts: Sequence[Insert]) -> list[Exception | None]:
        """Every caller's records and own write in one commit; a caller whose part
        fails (its own write, say) is rolled back alone, and alone hears of it."""
        failed: list[Exception | None] = []
        with self._lock, transaction(self._db) as db:
            for insert in inserts:
                db.execute("SAVEPOINT insert_one")
                try:
                    db.executemany(
                        "INSERT OR IGNORE INTO outbox (team, request_id, record) VALUES (?, ?, ?)",
                        [(r.team, r.request_id, r.SerializeToString()) for r in insert.records],
                    )
                    if insert.also is not None:
                        insert.also(db)
                except Exception as exc:
                    db.execute("ROLLBACK TO insert_one")
                    failed.append(exc)
                else:
                    failed.append(None)
                db.execute("RELEASE insert_one")
        return failed

    def park(self, record: ledger_pb2.UsageRecord, reason: str) -> None:
        """Out of the outbox into the dead letters, in one commit."""
        with self._lock, transaction(self._db) as db:
            db.execute(
                "INSERT OR REPLACE INTO dead_letter (team, request_id, record, reason)"
                " VALUES (?, ?, ?, ?)",
                (record.team, record.request_id, record.SerializeToString(), reason),
            )
            db.execute(
                "DELETE FROM outbox WHERE team = ? AND request_id = ?",
                (record.team, record.request_id),
            )

    def pending(self, after: int, limit: int) -> list[tuple[int, ledger_pb2.UsageRecord]]:
        """Up to `limit` records in the order written, after row `after`."""
        with self._lock:
            rows = self._db.execute(
                "SELECT rowid, record FROM outbox WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, limit),
            ).fetchall()
        return [(int(rowid), ledger_pb2.UsageRecord.FromString(blob)) for rowid, blob in rows]

    def delete(self, records: Sequence[ledger_pb2.UsageRecord]) -> None:
        with self._lock, transaction(self._db) as db:
            db.executemany(
                "DELETE FROM outbox WHERE team = ? AND request_id = ?",
                [(r.team, r.request_id) for r in records],
            )

    def count(self) -> int:
        """Records waiting; 0 once closed (a metrics collection may run after)."""
        with self._lock:
            if self._closed:
                return 0
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    def close(self) -> None:
        _OPEN.discard(self)
        with self._lock:
            self._closed = True
            self._db.close()
