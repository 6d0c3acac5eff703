"""A durable outbox for usage records: written to local disk before the ledger is asked,
deleted only once the ledger acknowledges, retried in the background until then.

Answers are recorded with `enqueue`: once a record is on disk it cannot be lost, so the
caller is answered without waiting for the ledger. A call's records are sent at once in
the background, in the call's trace; while CONCURRENT_SENDS sends are under way, calls
queue and the next send carries all of them in one RecordUsage (one ledger commit and
one delete for many calls: group commit), its span linked to each call's. Whatever a
send fails to deliver is left to the flusher (as is everything while the ledger is down)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from pathlib import Path

import grpc
from google.protobuf import text_format
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from costmesh.ledger.v1 import ledger_pb2
from services.common.outages import OutageLog
from services.common.sqlite import GroupCommit
from services.inference.outbox_file import AlsoWrite, Insert, OutboxFile

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
BATCH = 200
FLUSH_TIME_LIMIT = 10.0
# Sends under way at once; calls beyond wait for the next send, which takes them all
# (up to QUEUED_BATCH records, below the 128 links a span keeps by default).
CONCURRENT_SENDS = 2
QUEUED_BATCH = 100
# Records waiting for a send; beyond (a slow ledger), the flusher sends them.
MAX_QUEUED = 10_000
_TRACER = trace.get_tracer("costmesh.inference")


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
        self,
        path: Path,
        send: Send,
        retry_seconds: float,
        on_delivered: Delivered | None = None,
        on_parked: Parked | None = None,
    ) -> None:
        self._file = OutboxFile(path)
        # Inserts and deletes of concurrent calls share commits (one thread hop each).
        self._inserts: GroupCommit[Insert] = GroupCommit(self._file.put_all)
        self._deletes: GroupCommit[Sequence[ledger_pb2.UsageRecord]] = GroupCommit(
            lambda parts: self._file.delete([r for part in parts for r in part])
        )
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
        self._sends = 0  # senders under way of records on disk
        # Claimed records waiting for a send, with the span of the call that wrote them.
        self._queued: list[tuple[ledger_pb2.UsageRecord, trace.SpanContext]] = []
        self._queued_time_limit = FLUSH_TIME_LIMIT
        self._flushing = asyncio.Lock()
        self._outage = OutageLog(log, "usage delivery to the ledger (kept in the outbox)")

    @property
    def path(self) -> Path:
        return self._file.path

    async def deliver(
        self, record: ledger_pb2.UsageRecord, time_limit: float
    ) -> ledger_pb2.RecordedUsage | None:
        """Persist, then try once now; None means the ledger will get it later."""
        claimed = self._claim(record)
        try:
            persisted = await self._persist([record], None)
            results = await self._send_once([record], time_limit, persisted, report=False)
        finally:
            if claimed:
                self._release([record])
        return results[0][1] if results else None

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
            not self._ledger_down and len(self._queued) < MAX_QUEUED and self._claim(record)
            for record in records
        ]
        try:
            persisted = await self._persist(records, also)
        except BaseException:  # cancelled: what reached the disk goes with the flusher
            self._release(r for r, ok in zip(records, claimed, strict=True) if ok)
            raise
        if not persisted:
            for record, mine in zip(records, claimed, strict=True):
                ours = [record] if mine else []
                self._spawn(self._send_and_release([record], time_limit, False, ours))
        elif ours := [r for r, ok in zip(records, claimed, strict=True) if ok]:
            self._send_soon(ours, time_limit)
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

    def _spawn(self, sending: Coroutine[None, None, None]) -> asyncio.Task[None]:
        """In the caller's context, so a ledger write is part of its trace."""
        sender = asyncio.create_task(sending)
        self._senders.add(sender)
        sender.add_done_callback(self._senders.discard)
        return sender

    def _send_soon(self, records: Sequence[ledger_pb2.UsageRecord], time_limit: float) -> None:
        if self._sends >= CONCURRENT_SENDS:
            caller = trace.get_current_span().get_span_context()
            self._queued += [(record, caller) for record in records]
            self._queued_time_limit = time_limit
            return
        self._start_sender(records, time_limit)

    def _start_sender(self, records: Sequence[ledger_pb2.UsageRecord], time_limit: float) -> None:
        self._sends += 1
        # A callback, not a `finally`: it runs even for a task cancelled before it began.
        self._spawn(self._send_then_queued(records, time_limit)).add_done_callback(self._send_ended)

    def _send_ended(self, sender: asyncio.Task[None]) -> None:
        """Records queued after the sender's last look are sent by a new one; while
        the ledger is down, or once nobody is left to send them, by the flusher."""
        self._sends -= 1
        if not self._queued:
            return
        if not (self._ledger_down or sender.cancelled()):
            self._start_sender([], self._queued_time_limit)
        elif self._ledger_down or not self._sends:
            self._release(record for record, _ in self._queued)
            self._queued = []

    async def _send_then_queued(
        self, records: Sequence[ledger_pb2.UsageRecord], time_limit: float
    ) -> None:
        """These records, then whatever queued meanwhile, each batch in one send under
        a span of its own (a new trace) linked to the calls it carries."""
        if records:
            await self._send_and_release(records, time_limit, True, records)
        while self._queued and not self._ledger_down:
            batch, self._queued = self._queued[:QUEUED_BATCH], self._queued[QUEUED_BATCH:]
            records = [record for record, _ in batch]
            try:
                callers = {(c.trace_id, c.span_id): c for _, c in batch if c.is_valid}
                with _TRACER.start_as_current_span(
                    "costmesh.usage.deliver",
                    context=otel_context.Context(),
                    links=[trace.Link(caller) for caller in callers.values()],
                    attributes={"costmesh.usage.records": len(batch)},
                ) as span:
                    await self._send_and_release(records, time_limit, True, records)
                    if self._ledger_down:
                        span.set_status(Status(StatusCode.ERROR, "left to the flusher"))
            finally:
                self._release(records)  # whatever failed, the flusher may send them

    async def _send_and_release(
        self,
        records: Sequence[ledger_pb2.UsageRecord],
        time_limit: float,
        persisted: bool,
        claimed: Sequence[ledger_pb2.UsageRecord],
    ) -> None:
        try:
            await self._send_once(records, time_limit, persisted)
        finally:
            self._release(claimed)

    async def _send_once(
        self,
        records: Sequence[ledger_pb2.UsageRecord],
        time_limit: float,
        persisted: bool,
        *,
        report: bool = True,
    ) -> list[tuple[ledger_pb2.UsageRecord, ledger_pb2.RecordedUsage]]:
        """One send. What the ledger took is reported (with `report`), then deleted: a
        kill in between leaves a row to be sent and reported again, never unreported.
        The rest stays for the flusher, or, if it never reached the disk, is LOST."""
        try:
            results = await self._send_batch(records, time_limit, persisted)
        except Exception as exc:  # the ledger is down or failing: the flusher retries
            self._ledger_down = True
            self._outage.failed(_brief(exc))
            results, why = [], _brief(exc)
        else:
            why = "refused, or failing alone"
            if results:  # refusals alone say nothing of an outage's end
                self._ledger_down = False
                self._outage.succeeded()
        if not persisted:
            taken = {r.request_id for r, _ in results}
            for record in records:
                if record.request_id not in taken:
                    log.error("usage LOST (%s): %s", why, text_format.MessageToString(
                        record, as_one_line=True))  # fmt: skip
        if results and report and self._on_delivered is not None:
            await self._on_delivered(results)
        if results and persisted:
            await self._deletes.write([record for record, _ in results])
            self._done.update((r.team, r.request_id) for r, _ in results)
        return results

    def _release(self, records: Iterable[ledger_pb2.UsageRecord]) -> None:
        self._sending.difference_update((r.team, r.request_id) for r in records)

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
            await self._inserts.write(Insert(records, also))
        except Exception:
            # Disk full or broken (or the caller's own write failed): still try the
            # ledger directly, and if that fails too the "usage LOST" log line is the
            # only copy of this usage.
            log.exception(
                "outbox could not persist usage %s", ", ".join(r.request_id for r in records)
            )
            return False
        return True

    async def flush(self) -> int:
        """Send everything pending, a page at a time; the number of records delivered.

        Records the ledger refuses for now stay behind without blocking the rest.
        """
        async with self._flushing:
            return await self._flush_pages()

    async def _flush_pages(self) -> int:
        sent, after = 0, 0
        self._done.clear()
        while page := await asyncio.to_thread(self._file.pending, after, BATCH):
            after = page[-1][0]
            batch = [
                r
                for _, r in page
                if (r.team, r.request_id) not in self._sending
                and (r.team, r.request_id) not in self._done
            ]
            if not batch:
                continue
            results = await self._send_batch(batch, FLUSH_TIME_LIMIT, persisted=True)
            self._ledger_down = False
            if self._on_delivered is not None and results:  # before the rows go
                await self._on_delivered(results)
            await asyncio.to_thread(self._file.delete, [record for record, _ in results])
            sent += len(results)
        return sent

    async def _send_batch(
        self, batch: Sequence[ledger_pb2.UsageRecord], time_limit: float, persisted: bool = True
    ) -> list[tuple[ledger_pb2.UsageRecord, ledger_pb2.RecordedUsage]]:
        """What the ledger took of a batch; raises when it is down (or a lone record
        fails), and then all of it stays pending."""
        try:
            return list(zip(batch, await self._send(batch, time_limit), strict=True))
        except RefusedError as exc:
            if len(batch) == 1:
                if persisted:  # else there is no row to park
                    await self._refused(batch[0], exc)
                return []
            return await self._send_one_by_one(batch)
        except Exception as exc:
            if len(batch) == 1 or _unreachable(exc):
                raise
            # Any other failure may be one bad record's: it must not block the rest,
            # so they go one by one (the failing one stays pending).
            return await self._send_one_by_one(batch)

    async def _refused(self, record: ledger_pb2.UsageRecord, exc: RefusedError) -> None:
        """A malformed record is parked; one refused for now waits for a later try."""
        if exc.permanent:
            log.error("ledger rejected usage %s (%s); parked", record.request_id, exc)
            await asyncio.to_thread(self._file.park, record, str(exc))
            if self._on_parked is not None:
                self._on_parked([record])
        else:
            self._outage.failed(f"refused for now: {exc}")

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
                await self._refused(record, exc)
            except Exception as exc:  # stays pending; the others still go
                if _unreachable(exc):
                    raise
                self._outage.failed(f"{_brief(exc)} for usage {record.request_id}")
        return delivered

    def pending_count(self) -> int:
        return self._file.count()

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
        self._file.close()

    async def _flush_forever(self) -> None:
        while True:
            try:
                if await self.flush():
                    self._outage.succeeded()
            except Exception as exc:  # keep retrying until the ledger is back
                self._outage.failed(f"{_brief(exc)}; {self.pending_count()} pending")
            await asyncio.sleep(self._retry_seconds)


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
