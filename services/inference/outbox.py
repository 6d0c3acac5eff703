"""A durable outbox for usage records: written to local disk before the ledger is asked,
deleted only once the ledger acknowledges, retried in the background until then.

Answers are recorded with `enqueue`: once a record is on disk it cannot be lost, so the
caller is answered without waiting for the ledger; the record is sent at once in the
background, in the caller's trace, and left to the flusher if that fails (or at once
while the ledger is down or too many sends are under way)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import text_format
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from costmesh.ledger.v1 import ledger_pb2
from services.common.outages import OutageLog
from services.common.sqlite import GroupCommit, open_database, transaction

log = logging.getLogger(__name__)
# Sends records to the ledger within a time limit in seconds; raises when it cannot.
Send = Callable[
    [Sequence[ledger_pb2.UsageRecord], float], Awaitable[Sequence[ledger_pb2.RecordedUsage]]
]
# Told of records delivered after their call was answered, with the ledger's costs.
Delivered = Callable[
    [Sequence[tuple[ledger_pb2.UsageRecord, ledger_pb2.RecordedUsage]]], Awaitable[None]
]
# Told of records parked as malformed: they will never be delivered (nor billed).
Parked = Callable[[Sequence[ledger_pb2.UsageRecord]], None]
# A write of the caller's own that must commit with its records or not at all.
AlsoWrite = Callable[[sqlite3.Connection], None]
BATCH = 200
FLUSH_TIME_LIMIT = 10.0
# Background senders at once; beyond, or while the ledger is down, the flusher sends.
MAX_SENDERS = 256


class RefusedError(Exception):
    """The ledger refused records. `permanent`: they are malformed and can never be
    taken; otherwise (e.g. a model the ledger has no price for yet) a later try,
    after the ledger's configuration is fixed, may succeed."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


_OPEN: weakref.WeakSet[UsageOutbox] = weakref.WeakSet()


def _backlog(options: CallbackOptions) -> Iterable[Observation]:
    yield Observation(sum(outbox.pending_count() for outbox in list(_OPEN)))


metrics.get_meter("costmesh.inference").create_observable_gauge(
    "costmesh.outbox.pending",
    callbacks=[_backlog],
    unit="{record}",
    description="Usage rows written but not yet acknowledged by the ledger",
)


class UsageOutbox:
    """Survives a ledger outage and a restart: nothing is lost, repeats are harmless
    because the ledger ignores a request id it has already recorded. A malformed
    record the ledger rejects is parked in a dead-letter table (and logged); one it
    refuses for now (a model it cannot price yet) waits. Neither blocks the rest."""

    def __init__(
        self,
        path: Path,
        send: Send,
        retry_seconds: float,
        on_delivered: Delivered | None = None,
        on_parked: Parked | None = None,
    ) -> None:
        # NORMAL: survives a killed process (the failure the outbox is for) without an
        # fsync per call; only an OS crash or power loss can drop the last commits.
        self._path = path
        self._db = open_database(path)
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS outbox (team TEXT NOT NULL, request_id TEXT NOT NULL,"
            " record BLOB NOT NULL, PRIMARY KEY (team, request_id));"
            "CREATE TABLE IF NOT EXISTS dead_letter (team TEXT NOT NULL, request_id TEXT NOT NULL,"
            " record BLOB NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (team, request_id));"
        )
        self._lock = threading.Lock()
        # Inserts and deletes of concurrent calls share commits (one thread hop each).
        self._inserts: GroupCommit[_Insert] = GroupCommit(self._put_all)
        self._deletes: GroupCommit[ledger_pb2.UsageRecord] = GroupCommit(self._delete)
        self._send = send
        self._retry_seconds = retry_seconds
        self._on_delivered = on_delivered
        self._on_parked = on_parked
        self._flusher: asyncio.Task[None] | None = None
        # Records a sender has claimed, by (team, request id), from before they are
        # written until after they are deleted: a flush skips them, and those delivered
        # since the flush began (`_done`), so no record is reported delivered twice by
        # this process.
        self._sending: set[tuple[str, str]] = set()
        self._done: set[tuple[str, str]] = set()
        # The last send failed for a reason other than a refusal: leave new records
        # to the flusher rather than pile up senders that will fail too.
        self._ledger_down = False
        self._senders: set[asyncio.Task[None]] = set()
        self._flushing = asyncio.Lock()
        self._outage = OutageLog(log, "usage delivery to the ledger (kept in the outbox)")
        self._closed = False
        _OPEN.add(self)  # whole: a metrics collection may count it from now on

    @property
    def path(self) -> Path:
        return self._path

    async def deliver(
        self, record: ledger_pb2.UsageRecord, time_limit: float
    ) -> ledger_pb2.RecordedUsage | None:
        """Persist, then try once now; None means the ledger will get it later."""
        claimed = self._claim(record)
        persisted = await self._persist([record], None)
        return await self._send_claimed(record, time_limit, persisted, claimed)

    async def enqueue(
        self,
        records: Sequence[ledger_pb2.UsageRecord],
        time_limit: float,
        also: AlsoWrite | None = None,
    ) -> bool:
        """Persist now (with `also`, in the same transaction: all or nothing survives a
        kill) and send in the background; False if the disk failed, and then the
        records are sent directly (and logged as lost if that fails too)."""
        claimed = [
            not self._ledger_down and len(self._senders) < MAX_SENDERS and self._claim(record)
            for record in records
        ]
        persisted = await self._persist(records, also)
        for record, mine in zip(records, claimed, strict=True):
            if mine or not persisted:
                # Sent in the caller's context, so the ledger write is part of its trace.
                sender = asyncio.create_task(self._send_later(record, time_limit, persisted, mine))
                self._senders.add(sender)
                sender.add_done_callback(self._senders.discard)
        return persisted

    async def settled(self) -> None:
        """Wait until every record enqueued so far has been offered to the ledger
        (what it could not take stays pending). For shutdown, demos and tests."""
        while self._senders:
            await asyncio.wait(set(self._senders))
        try:
            await self.flush()  # what was left to the flusher
        except Exception as exc:
            log.warning("outbox flush failed: %s", _brief(exc))

    def _claim(self, record: ledger_pb2.UsageRecord) -> bool:
        key = (record.team, record.request_id)
        if key in self._sending:
            return False
        self._sending.add(key)
        return True

    async def _persist(
        self, records: Sequence[ledger_pb2.UsageRecord], also: AlsoWrite | None
    ) -> bool:
        try:
            await self._inserts.write(_Insert(records, also))
        except Exception:
            # Disk full or broken (or the caller's own write failed): still try the
            # ledger directly, and if that fails too the "usage LOST" log line is the
            # only copy of this usage.
            log.exception(
                "outbox could not persist usage %s", ", ".join(r.request_id for r in records)
            )
            return False
        return True

    async def _send_later(
        self, record: ledger_pb2.UsageRecord, time_limit: float, persisted: bool, claimed: bool
    ) -> None:
        await self._send_claimed(record, time_limit, persisted, claimed, report=True)

    async def _send_claimed(
        self,
        record: ledger_pb2.UsageRecord,
        time_limit: float,
        persisted: bool,
        claimed: bool,
        *,
        report: bool = False,
    ) -> ledger_pb2.RecordedUsage | None:
        """Send once; the claim (if this caller holds it) lasts until the row is gone.
        With `report`, the delivery is reported before the row is deleted: a kill in
        between leaves the row to be sent (and reported) again, never unreported."""
        key = (record.team, record.request_id)
        try:
            result = await self._send_now(record, time_limit, persisted)
            if result is not None and report and self._on_delivered is not None:
                await self._on_delivered([(record, result)])
            if result is not None and persisted:
                await self._deletes.write(record)
                self._done.add(key)
            return result
        finally:
            if claimed:
                self._sending.discard(key)

    async def _send_now(
        self, record: ledger_pb2.UsageRecord, time_limit: float, persisted: bool
    ) -> ledger_pb2.RecordedUsage | None:
        try:
            (result,) = await self._send([record], time_limit)
        except RefusedError as exc:
            self._ledger_down = False
            if exc.permanent and persisted:
                await asyncio.to_thread(self._park, record, str(exc))
            self._lost_unless(persisted, record, str(exc))
            return None
        except Exception as exc:  # any other failure: the flusher retries it
            self._ledger_down = True
            self._outage.failed(_brief(exc))
            self._lost_unless(persisted, record, _brief(exc))
            return None
        self._ledger_down = False
        self._outage.succeeded()
        return result

    async def flush(self) -> int:
        """Send everything pending, a page at a time; the number of records delivered.

        Records the ledger refuses for now stay behind without blocking the rest.
        """
        async with self._flushing:
            return await self._flush_pages()

    async def _flush_pages(self) -> int:
        sent, after = 0, 0
        self._done.clear()
        while page := await asyncio.to_thread(self._pending, after, BATCH):
            after = page[-1][0]
            batch = [
                r
                for _, r in page
                if (r.team, r.request_id) not in self._sending
                and (r.team, r.request_id) not in self._done
            ]
            if not batch:
                continue
            try:
                results = list(zip(batch, await self._send(batch, FLUSH_TIME_LIMIT), strict=True))
            except RefusedError:
                results = await self._send_one_by_one(batch)
            except Exception as exc:
                if len(batch) == 1 or _unreachable(exc):
                    raise  # the ledger is down (or this record fails): retried later
                # Any other failure may be one bad record's: it must not block the
                # rest, so they go one by one (the failing one stays pending).
                results = await self._send_one_by_one(batch)
            self._ledger_down = False
            if self._on_delivered is not None and results:  # before the rows go
                await self._on_delivered(results)
            await asyncio.to_thread(self._delete, [record for record, _ in results])
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
            except Exception as exc:  # stays pending; the others still go
                if _unreachable(exc):
                    raise
                self._outage.failed(f"{_brief(exc)} for usage {record.request_id}")
        return delivered

    @staticmethod
    def _lost_unless(persisted: bool, record: ledger_pb2.UsageRecord, why: str) -> None:
        if not persisted:
            log.error(
                "usage LOST (%s): %s", why, text_format.MessageToString(record, as_one_line=True)
            )

    def pending_count(self) -> int:
        with self._lock:
            if self._closed:  # a collection that began before stop() finished
                return 0
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
        _OPEN.discard(self)
        with self._lock:
            self._closed = True
            self._db.close()

    async def _flush_forever(self) -> None:
        while True:
            try:
                if await self.flush():
                    self._outage.succeeded()
            except Exception as exc:  # keep retrying until the ledger is back
                self._outage.failed(f"{_brief(exc)}; {self.pending_count()} pending")
            await asyncio.sleep(self._retry_seconds)

    def _put_all(self, inserts: Sequence[_Insert]) -> list[Exception | None]:
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

    def _park(self, record: ledger_pb2.UsageRecord, reason: str) -> None:
        log.error("ledger rejected usage %s (%s); parked in dead_letter", record.request_id, reason)
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
        if self._on_parked is not None:
            self._on_parked([record])

    def _pending(self, after: int, limit: int) -> list[tuple[int, ledger_pb2.UsageRecord]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT rowid, record FROM outbox WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, limit),
            ).fetchall()
        return [(int(rowid), ledger_pb2.UsageRecord.FromString(blob)) for rowid, blob in rows]

    def _delete(self, records: Sequence[ledger_pb2.UsageRecord]) -> None:
        with self._lock, transaction(self._db) as db:
            db.executemany(
                "DELETE FROM outbox WHERE team = ? AND request_id = ?",
                [(r.team, r.request_id) for r in records],
            )


@dataclass(frozen=True)
class _Insert:
    """One caller's records, and its own write to commit with them."""

    records: Sequence[ledger_pb2.UsageRecord]
    also: AlsoWrite | None


def _unreachable(exc: Exception) -> bool:
    """The ledger is down or slow, rather than failing on particular records."""
    code = getattr(exc, "code", None)
    return callable(code) and code() in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def _brief(exc: Exception) -> str:
    """One line about a failure: gRPC errors carry a multi-line debug string."""
    code = getattr(exc, "code", None)
    return code().name if callable(code) else type(exc).__name__
