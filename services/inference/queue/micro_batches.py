"""MicroBatchQueue: accepts batches at once and runs their requests through the
request path, a few at a time, from whichever backend holds them."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.status import Status, StatusCode
from redis.exceptions import RedisError

from costmesh.inference.v1 import inference_pb2
from services.common.auth import Principal
from services.common.config import Config
from services.common.errors import (
    NotFound,
    ServiceError,
    Unavailable,
)
from services.common.outages import OutageLog
from services.inference.batch_requests import check_batch
from services.inference.queue.items import (
    BATCH_ID,
    MAX_LINKS,
    MAX_WAITING,
    PREFIX,
    PROPAGATOR,
    RETRY_SECONDS,
    RULES,
    Answer,
    Backend,
    Batch,
    Item,
    Outcome,
    QueueSettings,
)
from services.inference.queue.memory import MemoryBackend
from services.inference.queue.redis_backend import RedisBackend
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)


class MicroBatchQueue:
    """Requests wait at most max_wait_ms or until max_batch are gathered, then run
    with bounded concurrency; results are kept result_ttl_seconds for GetBatch."""

    def __init__(
        self,
        config: Config,
        answer: Answer,
        *,
        tracer: trace.Tracer | None = None,
        consumer: str | None = None,
        claim_idle_seconds: float = 60.0,
        max_waiting: int = MAX_WAITING,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`consumer` names this Redis consumer (default: the name kept in the data
        directory); `claim_idle_seconds` is how long another consumer's entry must lie
        untouched before this one takes it over."""
        self._settings = settings = QueueSettings.from_config(config)
        # Requests are checked as Complete checks them, before anything is queued.
        self._inference = InferenceSettings.from_config(config)
        self._answer = answer
        self._tracer = tracer or trace.get_tracer(__name__)
        self._clock = clock
        self._backend: Backend
        if settings.backend == "redis":
            self._backend = RedisBackend(settings, consumer, claim_idle_seconds, max_waiting, clock)
        else:
            self._backend = MemoryBackend(settings.result_ttl_seconds, max_waiting, clock)
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        self._held = 0  # requests taken and not yet finished
        self._room = asyncio.Event()  # set while fewer than `concurrency` are held
        self._room.set()
        self._consumer: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._outage = OutageLog(log, f"micro-batch queue ({settings.backend})")

    async def start(self) -> None:
        """Start the consumer (and, with Redis, resume what an earlier one left)."""
        self._stopping = False
        await self._backend.start()
        self._consumer = asyncio.create_task(self._consume(), name="micro-batch-consumer")

    async def stop(self) -> None:
        """Stop consuming; with Redis nothing enqueued is lost.

        Answers under way are finished and stored (they are being paid for); requests
        taken but not started are left to the next consumer (Redis keeps them pending).
        """
        self._stopping = True
        if self._consumer is not None:
            self._consumer.cancel()
            await asyncio.gather(self._consumer, return_exceptions=True)
            self._consumer = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        await self._backend.close()

    async def submit(
        self, request: inference_pb2.SubmitBatchRequest, principal: Principal
    ) -> inference_pb2.SubmitBatchResponse:
        checked = [(c.caller_id, c.request) for c in check_batch(request, self._inference, RULES)]
        batch_id = PREFIX + uuid.uuid4().hex
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier)
        now = self._clock()
        items = []
        for caller_id, complete in checked:
            complete.request_id = f"{batch_id}:{caller_id}"  # see Item
            items.append(Item(batch_id, caller_id, complete, principal, now, carrier))
        ids = [caller_id for caller_id, _ in checked]
        try:
            await self._backend.enqueue(batch_id, Batch(principal.team, len(ids), ids), items)
        except RedisError as exc:
            raise Unavailable(
                f"the queue's Redis is unavailable ({type(exc).__name__}); retry later",
                reason="QUEUE_UNAVAILABLE",
            ) from exc
        trace.get_current_span().set_attributes(
            {"costmesh.queue.batch_id": batch_id, "costmesh.queue.size": len(items)}
        )
        return inference_pb2.SubmitBatchResponse(batch_id=batch_id)

    async def get(self, batch_id: str, principal: Principal) -> inference_pb2.GetBatchResponse:
        batch = None
        if BATCH_ID.fullmatch(batch_id):
            try:
                batch = await self._backend.read(batch_id)
            except RedisError as exc:
                raise Unavailable(
                    f"the queue's Redis is unavailable ({type(exc).__name__}); retry later",
                    reason="QUEUE_UNAVAILABLE",
                ) from exc
        # Another team's batch reads as unknown: its existence is not theirs to learn.
        if batch is None or (batch.team != principal.team and principal.role != "admin"):
            raise NotFound(f"batch_id: no batch {batch_id!r} (unknown, expired or not yours)")
        reply = inference_pb2.GetBatchResponse(
            batch_id=batch_id, total=batch.total, mode=inference_pb2.BATCH_MODE_QUEUE
        )
        for caller_id in batch.ids:
            outcome = batch.outcomes.get(caller_id)
            if isinstance(outcome, inference_pb2.CompleteResponse):
                reply.results.append(outcome)
            elif isinstance(outcome, inference_pb2.BatchFailure):
                reply.failures.append(outcome)
        reply.completed, reply.failed = len(reply.results), len(reply.failures)
        if reply.completed + reply.failed >= batch.total:
            reply.status = "completed"
        elif batch.started or reply.completed or reply.failed:
            reply.status = "in_progress"
        else:
            reply.status = "queued"
        return reply

    # -- the consumer --------------------------------------------------------------

    async def _consume(self) -> None:
        while not self._stopping:
            await self._room.wait()
            try:
                items = await self._backend.take(
                    self._settings.max_batch, self._settings.max_wait_seconds
                )
            except RedisError as exc:
                # redis-py may turn the cancel of a blocked read into a connection error.
                if self._stopping:
                    return
                self._outage.failed(type(exc).__name__)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            except Exception:
                log.exception("micro-batch consumer failed; going on")
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self._outage.succeeded()
            if not items:
                continue
            self._held += len(items)
            if self._held >= self._settings.concurrency:
                self._room.clear()
            task = asyncio.create_task(self._run_batch(items))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_batch(self, items: Sequence[Item]) -> None:
        waited = self._clock() - min(item.enqueued_at for item in items)
        links = [trace.Link(c) for c in distinct_contexts(i.carrier for i in items)]
        with self._tracer.start_as_current_span(
            "queue.batch",
            # A root: a batch mixes requests of many traces, each linked from it.
            context=otel_context.Context(),
            kind=trace.SpanKind.CONSUMER,
            links=links[:MAX_LINKS],
            attributes={
                "costmesh.queue.size": len(items),
                "costmesh.queue.wait_ms": max(0, round(waited * 1000)),
                "costmesh.queue.backend": self._settings.backend,
            },
        ) as span:
            batch = trace.Link(span.get_span_context())
            await asyncio.gather(*(self._run_item(item, batch) for item in items))

    async def _run_item(self, item: Item, batch: trace.Link) -> None:
        try:
            async with self._semaphore:
                if self._stopping:
                    return  # not started: left to the next consumer
                if not await self._backend.claim(item):
                    return
                outcome = await self._outcome(item, batch)
                await self._backend.finish(item, outcome)
        except RedisError as exc:
            # Not acked: the entry is answered again later, and the replay is idempotent.
            self._outage.failed(type(exc).__name__)
        except Exception:
            log.exception("batch %s request %r: could not finish", item.batch_id, item.caller_id)
        finally:
            self._held -= 1
            if self._held < self._settings.concurrency:
                self._room.set()

    async def _outcome(self, item: Item, batch: trace.Link) -> Outcome:
        """The answer or the failure of one request, in a span of the submitter's trace
        (so one trace id still runs from SubmitBatch to the provider and the ledger)."""
        with self._tracer.start_as_current_span(
            "queue.request",
            context=PROPAGATOR.extract(item.carrier),
            links=[batch],
            attributes={
                "costmesh.queue.batch_id": item.batch_id,
                "costmesh.queue.request_id": item.caller_id,
            },
        ) as span:
            try:
                response = await self._answer(item.request, item.principal)
            except ServiceError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.reason))
                return inference_pb2.BatchFailure(
                    request_id=item.caller_id, code=exc.code.name, message=exc.message
                )
            except Exception as exc:
                log.exception("batch %s request %r failed", item.batch_id, item.caller_id)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                return inference_pb2.BatchFailure(
                    request_id=item.caller_id,
                    code="INTERNAL",
                    message="internal error; see the service log",
                )
        result = inference_pb2.CompleteResponse()
        result.CopyFrom(response)
        result.request_id = item.caller_id
        return result


def distinct_contexts(carriers: Iterable[dict[str, str]]) -> list[trace.SpanContext]:
    seen: dict[tuple[int, int], trace.SpanContext] = {}
    for carrier in carriers:
        context = trace.get_current_span(PROPAGATOR.extract(carrier)).get_span_context()
        if context.is_valid:
            seen.setdefault((context.trace_id, context.span_id), context)
    return list(seen.values())
