"""A durable outbox for usage records: written to local disk before the ledger is asked,
deleted only once the ledger acknowledges, retried in the background until then."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from costmesh.ledger.v1 import ledger_pb2
from services.common.outages import OutageLog

log = logging.getLogger(__name__)
# Sends records to the ledger within a time limit in seconds; raises when it cannot.
Send = Callable[
    [Sequence[ledger_pb2.UsageRecord], float], Awaitable[Sequence[ledger_pb2.RecordedUsage]]
]
BATCH = 200
FLUSH_TIME_LIMIT = 10.0


class RejectedError(Exception):
    """The ledger refused the records as invalid: retrying them unchanged cannot help."""


class UsageOutbox:
    """Survives a ledger outage and a restart: nothing is lost, repeats are harmless
    because the ledger ignores a request id it has already recorded. A record the
    ledger rejects is parked in a dead-letter table (and logged) so that it cannot
    block the records behind it."""

    def __init__(self, path: Path, send: Send, retry_seconds: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL survives a killed process (the failure the outbox is for) without
        # an fsync per call; only an OS crash or power loss can drop the last commits.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS outbox (team TEXT NOT NULL, request_id TEXT NOT NULL,"
            " record BLOB NOT NULL, PRIMARY KEY (team, request_id));"
            "CREATE TABLE IF NOT EXISTS dead_letter (team TEXT NOT NULL, request_id TEXT NOT NULL,"
            " record BLOB NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (team, request_id));"
        )
        self._lock = threading.Lock()
        self._send = send
        self._retry_seconds = retry_seconds
        self._flusher: asyncio.Task[None] | None = None
        self._outage = OutageLog(log, "usage delivery to the ledger (kept in the outbox)")

    async def deliver(
        self, record: ledger_pb2.UsageRecord, time_limit: float
    ) -> ledger_pb2.RecordedUsage | None:
        """Persist, then try once now; None means the ledger will get it later."""
        await asyncio.to_thread(self._put, record)
        try:
            (result,) = await self._send([record], time_limit)
        except RejectedError as exc:
            await asyncio.to_thread(self._park, record, str(exc))
            return None
        except Exception as exc:  # any other failure: the flusher retries it
            self._outage.failed(_brief(exc))
            return None
        self._outage.succeeded()
        await asyncio.to_thread(self._delete, [record])
        return result

    async def flush(self) -> int:
        """Send everything pending; the number of records the ledger acknowledged."""
        sent = 0
        while batch := await asyncio.to_thread(self._pending, BATCH):
            try:
                await self._send(batch, FLUSH_TIME_LIMIT)
                delivered = list(batch)
            except RejectedError:
                delivered = await self._send_one_by_one(batch)
            await asyncio.to_thread(self._delete, delivered)
            sent += len(delivered)
            if len(batch) < BATCH:
                break
        return sent

    async def _send_one_by_one(
        self, batch: Sequence[ledger_pb2.UsageRecord]
    ) -> list[ledger_pb2.UsageRecord]:
        """The records of a rejected batch that the ledger takes alone; the rest are parked."""
        delivered = []
        for record in batch:
            try:
                await self._send([record], FLUSH_TIME_LIMIT)
                delivered.append(record)
            except RejectedError as exc:
                await asyncio.to_thread(self._park, record, str(exc))
        return delivered

    def pending_count(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    async def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_forever())

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        with contextlib.suppress(Exception):
            await self.flush()
        with self._lock:
            self._db.close()

    async def _flush_forever(self) -> None:
        while True:
            try:
                if await self.flush():
                    self._outage.succeeded()
            except Exception as exc:  # keep retrying until the ledger is back
                self._outage.failed(f"{_brief(exc)}; {self.pending_count()} pending")
            await asyncio.sleep(self._retry_seconds)

    def _put(self, record: ledger_pb2.UsageRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO outbox (team, request_id, record) VALUES (?, ?, ?)",
                (record.team, record.request_id, record.SerializeToString()),
            )

    def _park(self, record: ledger_pb2.UsageRecord, reason: str) -> None:
        log.error("ledger rejected usage %s (%s); parked in dead_letter", record.request_id, reason)
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR REPLACE INTO dead_letter (team, request_id, record, reason)"
                " VALUES (?, ?, ?, ?)",
                (record.team, record.request_id, record.SerializeToString(), reason),
            )
            self._db.execute(
                "DELETE FROM outbox WHERE team = ? AND request_id = ?",
                (record.team, record.request_id),
            )
            self._db.execute("COMMIT")

    def _pending(self, limit: int) -> list[ledger_pb2.UsageRecord]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM outbox LIMIT ?", (limit,)).fetchall()
        return [ledger_pb2.UsageRecord.FromString(blob) for (blob,) in rows]

    def _delete(self, records: Sequence[ledger_pb2.UsageRecord]) -> None:
        with self._lock:
            self._db.executemany(
                "DELETE FROM outbox WHERE team = ? AND request_id = ?",
                [(r.team, r.request_id) for r in records],
            )


def _brief(exc: Exception) -> str:
    """One line about a failure: gRPC errors carry a multi-line debug string."""
    code = getattr(exc, "code", None)
    return code().name if callable(code) else type(exc).__name__
