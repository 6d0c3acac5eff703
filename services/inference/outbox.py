"""A durable outbox for usage records: written to local disk before the ledger is asked,
deleted only once the ledger acknowledges, retried in the background until then.

Answers are recorded with `enqueue`: once a record is on disk it cannot be lost, so the
caller is answered without waiting for the ledger; the record is sent at once in the
background, in the caller's trace, and left to the flusher if that fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from google.protobuf import text_format

from costmesh.ledger.v1 import ledger_pb2
from services.common.outages import OutageLog
from services.common.sqlite import open_database

log = logging.getLogger(__name__)
# Sends records to the ledger within a time limit in seconds; raises when it cannot.
Send = Callable[
    [Sequence[ledger_pb2.UsageRecord], float], Awaitable[Sequence[ledger_pb2.RecordedUsage]]
]
# Told of records delivered after their call was answered, with the ledger's costs.
Delivered = Callable[
    [Sequence[tuple[ledger_pb2.UsageRecord, ledger_pb2.RecordedUsage]]], Awaitable[None]
]
BATCH = 200
FLUSH_TIME_LIMIT = 10.0


class RefusedError(Exception):
    """The ledger refused records. `permanent`: they are malformed and can never be
    taken; otherwise (e.g. a model the ledger has no price for yet) a later try,
    after the ledger's configuration is fixed, may succeed."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class UsageOutbox:
    """Survives a ledger outage and a restart: nothing is lost, repeats are harmless
    because the ledger ignores a request id it has already recorded. A malformed
    record the ledger rejects is parked in a dead-letter table (and logged); one it
    refuses for now (a model it cannot price yet) waits. Neither blocks the rest."""

    def __init__(
        self, path: Path, send: Send, retry_seconds: float, on_delivered: Delivered | None = None
    ) -> None:
        # NORMAL: survives a killed process (the failure the outbox is for) without an
        # fsync per call; only an OS crash or power loss can drop the last commits.
        self._db = open_database(path)
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS outbox (team TEXT NOT NULL, request_id TEXT NOT NULL,"
            " record BLOB NOT NULL, PRIMARY KEY (team, request_id));"
            "CREATE TABLE IF NOT EXISTS dead_letter (team TEXT NOT NULL, request_id TEXT NOT NULL,"
            " record BLOB NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (team, request_id));"
        )
        self._lock = threading.Lock()
        self._send = send
        self._retry_seconds = retry_seconds
        self._on_delivered = on_delivered
        self._flusher: asyncio.Task[None] | None = None
        # Records being sent right now, by (team, request id): a flush skips them, so
        # no record is reported delivered twice by this process.
        self._sending: set[tuple[str, str]] = set()
        self._senders: set[asyncio.Task[None]] = set()
        self._flushing = asyncio.Lock()
        self._outage = OutageLog(log, "usage delivery to the ledger (kept in the outbox)")

    async def deliver(
        self, record: ledger_pb2.UsageRecord, time_limit: float
    ) -> ledger_pb2.RecordedUsage | None:
        """Persist, then try once now; None means the ledger will get it later."""
        try:
            await asyncio.to_thread(self._put, record)
        except sqlite3.Error:
            # Disk full or broken: still try the ledger directly, and if that fails
            # too the log line below is the only copy of this usage.
            log.exception("outbox could not persist usage %s", record.request_id)
            persisted = False
        else:
            persisted = True
        return await self._send_now(record, time_limit, persisted)

    async def enqueue(self, record: ledger_pb2.UsageRecord, time_limit: float) -> None:
        """Persist now and send in the background; raises only if the disk fails, and
        then nothing was promised to anyone."""
        await asyncio.to_thread(self._put, record)
        # Sent in the caller's context, so the ledger write is part of its trace.
        sender = asyncio.create_task(self._send_later(record, time_limit))
        self._senders.add(sender)
        sender.add_done_callback(self._senders.discard)

    async def settled(self) -> None:
        """Wait until every record enqueued so far has been offered to the ledger
        (what it could not take stays pending). For shutdown, demos and tests."""
        while self._senders:
            await asyncio.wait(set(self._senders))

    async def _send_later(self, record: ledger_pb2.UsageRecord, time_limit: float) -> None:
        result = await self._send_now(record, time_limit, persisted=True)
        if result is not None and self._on_delivered is not None:
            await self._on_delivered([(record, result)])

    async def _send_now(
        self, record: ledger_pb2.UsageRecord, time_limit: float, persisted: bool
    ) -> ledger_pb2.RecordedUsage | None:
        key = (record.team, record.request_id)
        self._sending.add(key)
        try:
            (result,) = await self._send([record], time_limit)
        except RefusedError as exc:
            if exc.permanent and persisted:
                await asyncio.to_thread(self._park, record, str(exc))
            self._lost_unless(persisted, record, str(exc))
            return None
        except Exception as exc:  # any other failure: the flusher retries it
            self._outage.failed(_brief(exc))
            self._lost_unless(persisted, record, _brief(exc))
            return None
        finally:
            self._sending.discard(key)
        self._outage.succeeded()
        if persisted:
            await asyncio.to_thread(self._delete, [record])
        return result

    async def flush(self) -> int:
        """Send everything pending, a page at a time; the number of records delivered.

        Records the ledger refuses for now stay behind without blocking the rest.
        """
        async with self._flushing:
            return await self._flush_pages()

    async def _flush_pages(self) -> int:
        sent, after = 0, 0
        while page := await asyncio.to_thread(self._pending, after, BATCH):
            after = page[-1][0]
            batch = [r for _, r in page if (r.team, r.request_id) not in self._sending]
            if not batch:
                continue
            try:
                results = list(zip(batch, await self._send(batch, FLUSH_TIME_LIMIT), strict=True))
            except RefusedError:
                results = await self._send_one_by_one(batch)
            await asyncio.to_thread(self._delete, [record for record, _ in results])
            if self._on_delivered is not None and results:
                await self._on_delivered(results)
            sent += len(results)
        return sent

    async def _send_one_by_one(
        self, batch: Sequence[ledger_pb2.UsageRecord]
    ) -> list[tuple[ledger_pb2.UsageRecord, ledger_pb2.RecordedUsage]]:
        """What the ledger takes of a refused batch, record by record; malformed records
        are parked, the rest of the refused stay for a later try."""
        delivered = []
        for record in batch:
            try:
                (result,) = await self._send([record], FLUSH_TIME_LIMIT)
                delivered.append((record, result))
            except RefusedError as exc:
                if exc.permanent:
                    await asyncio.to_thread(self._park, record, str(exc))
                else:
                    self._outage.failed(f"refused for now: {exc}")
        return delivered

    @staticmethod
    def _lost_unless(persisted: bool, record: ledger_pb2.UsageRecord, why: str) -> None:
        if not persisted:
            log.error(
                "usage LOST (%s): %s", why, text_format.MessageToString(record, as_one_line=True)
            )

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
        await self.settled()
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

    def _pending(self, after: int, limit: int) -> list[tuple[int, ledger_pb2.UsageRecord]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT rowid, record FROM outbox WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, limit),
            ).fetchall()
        return [(int(rowid), ledger_pb2.UsageRecord.FromString(blob)) for rowid, blob in rows]

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
