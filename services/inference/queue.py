"""SubmitBatch through costmesh's micro-batching queue (BATCH_MODE_QUEUE).

A batch is accepted at once: it is checked, given an id, recorded, and every request
is put on the queue. A consumer takes up to `max_batch` requests, or whatever has come
`max_wait_ms` after the first of them was enqueued, and runs them through the whole
request path (cache, routing, provider, ledger) with at most `concurrency` in flight.
Each result or failure is kept `result_ttl_seconds` for GetBatch.

What a caller sends:
  - every request needs a request_id, unique in the batch: results and failures are
    matched to requests by it;
  - the batch's `feature` fills the feature of each request that has none; a request
    naming a *different* feature is refused (overriding it silently would bill the
    wrong feature, ignoring the batch's would make it meaningless). With no batch
    feature, each request names its own;
  - every request is checked as Complete would check it before anything is queued,
    so one bad request refuses the whole batch with its field named
    (`requests[3].model`), and nothing is enqueued.

Backends ([queue] backend):
  memory  an in-process deque and dicts, bounded in waiting requests; what is queued
          is lost with the process.
  redis   nothing enqueued is lost when a consumer stops or crashes. Keys, under the
          configured prefix P:
            P:stream           stream of requests, read through consumer group "costmesh";
                               an entry is acked (and deleted) only once its result is stored
            P:batch:<id>       hash: team, total, the caller's ids (JSON), created
            P:started:<id>     string: set when a request of the batch first runs
            P:results:<id>     hash: caller's request_id -> b"r" + CompleteResponse or
                               b"f" + BatchFailure
          The batch keys expire result_ttl_seconds after the last write.
          A consumer is named after its data directory (a name kept in a file there), so
          a restarted one first reads its own pending entries again; entries of a
          consumer that does not come back are claimed by any other once idle for
          `claim_idle_seconds` (XAUTOCLAIM). A live consumer keeps the entries it holds
          from being claimed by re-claiming them to itself (XCLAIM JUSTID) as it works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis.asyncio as aioredis
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.status import Status, StatusCode
from redis.exceptions import RedisError, ResponseError
from redis.typing import StreamIdT as StreamId

from costmesh.inference.v1 import inference_pb2
from services.common.auth import Principal
from services.common.config import Config, ConfigError
from services.common.errors import (
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.common.outages import OutageLog
from services.inference.batch_requests import BatchRules, check_batch
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)

PREFIX = "queue_"
Answer = Callable[
    [inference_pb2.CompleteRequest, Principal], Awaitable[inference_pb2.CompleteResponse]
]
Outcome = inference_pb2.CompleteResponse | inference_pb2.BatchFailure

MAX_REQUESTS = 10_000  # per SubmitBatch
RULES = BatchRules(max_requests=MAX_REQUESTS, feature_required=False, experiments=True)
MAX_WAITING = 100_000  # requests queued and not yet answered, over all batches
_BATCH_ID = re.compile(rf"{PREFIX}[0-9a-f]{{32}}")
_MAX_LINKS = 64  # submitting traces linked from one queue.batch span
_GROUP = "costmesh"
_BLOCK_MS = 1000  # longest blocking read, so a stopping consumer notices soon
_RETRY_SECONDS = 0.5  # after a Redis error in the consumer
_CONSUMER_FILE = "queue-consumer"
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class QueueSettings:
    backend: str
    redis_url: str
    redis_prefix: str
    max_batch: int
    max_wait_seconds: float
    concurrency: int
    result_ttl_seconds: int
    data_dir: Path

    @classmethod
    def from_config(cls, config: Config) -> QueueSettings:
        queue = config.section("queue")
        backend = queue.get_choice("backend", ("memory", "redis"), "memory")
        url = queue.get_str("redis_url", "redis://127.0.0.1:6379/0")
        if backend == "redis" and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"{queue.key_name('redis_url')}: expected a redis://, rediss:// or unix:// URL,"
                f" got {url!r}"
            )
        prefix = queue.get_str("redis_prefix", "costmesh:queue")
        if not prefix:
            raise ConfigError(f"{queue.key_name('redis_prefix')}: must not be empty")
        max_batch = queue.get_int("max_batch", 16, minimum=1)
        if max_batch > MAX_REQUESTS:
            raise ConfigError(
                f"{queue.key_name('max_batch')}: at most {MAX_REQUESTS}, got {max_batch}"
            )
        return cls(
            backend=backend,
            redis_url=url,
            redis_prefix=prefix,
            max_batch=max_batch,
            max_wait_seconds=queue.get_int("max_wait_ms", 50, minimum=0) / 1000,
            concurrency=queue.get_int("concurrency", 8, minimum=1),
            result_ttl_seconds=queue.get_int("result_ttl_seconds", 3600, minimum=1),
            data_dir=Path(config.section("server").get_str("data_dir")),
        )


@dataclass
class _Item:
    """One queued request.

    `request.request_id` is f"{batch_id}:{caller_id}", not the caller's id: request ids
    are remembered per team by the request path (a repeat is answered from its first
    answer, never billed again), and two batches of a team may well both use "1". The
    batch-unique id makes a replay of this item (a consumer that answered it but
    stopped before acking it) idempotent, and keeps it apart from every other item.
    Results carry the caller's id again.
    """

    batch_id: str
    caller_id: str
    request: inference_pb2.CompleteRequest
    principal: Principal
    enqueued_at: float  # wall clock, as consumers may run on other machines
    carrier: dict[str, str]  # W3C trace context of the SubmitBatch call
    token: str = ""  # the backend's handle: the stream entry id in Redis


@dataclass
class _Batch:
    """What GetBatch reads."""

    team: str
    total: int
    ids: list[str]
    started: bool = False
    outcomes: dict[str, Outcome] = field(default_factory=dict)


class _Backend(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, batch_id: str, batch: _Batch, items: Sequence[_Item]) -> None: ...

    async def take(self, max_batch: int, max_wait: float) -> list[_Item]:
        """The next batch: blocks (a bounded while) for a first request, then gathers
        more until max_batch or max_wait after the first was enqueued."""
        ...

    async def claim(self, item: _Item) -> bool:
        """Mark the item's batch started; False when it needs no answer (already stored)."""
        ...

    async def finish(self, item: _Item, outcome: Outcome) -> None: ...

    async def read(self, batch_id: str) -> _Batch | None: ...


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
        self._backend: _Backend
        if settings.backend == "redis":
            self._backend = _RedisBackend(
                settings, consumer, claim_idle_seconds, max_waiting, clock
            )
        else:
            self._backend = _MemoryBackend(settings.result_ttl_seconds, max_waiting, clock)
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
        _PROPAGATOR.inject(carrier)
        now = self._clock()
        items = []
        for caller_id, complete in checked:
            complete.request_id = f"{batch_id}:{caller_id}"  # see _Item
            items.append(_Item(batch_id, caller_id, complete, principal, now, carrier))
        ids = [caller_id for caller_id, _ in checked]
        try:
            await self._backend.enqueue(batch_id, _Batch(principal.team, len(ids), ids), items)
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
        if _BATCH_ID.fullmatch(batch_id):
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
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            except Exception:
                log.exception("micro-batch consumer failed; going on")
                await asyncio.sleep(_RETRY_SECONDS)
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

    async def _run_batch(self, items: Sequence[_Item]) -> None:
        waited = self._clock() - min(item.enqueued_at for item in items)
        links = [trace.Link(c) for c in _distinct_contexts(i.carrier for i in items)]
        with self._tracer.start_as_current_span(
            "queue.batch",
            # A root: a batch mixes requests of many traces, each linked from it.
            context=otel_context.Context(),
            kind=trace.SpanKind.CONSUMER,
            links=links[:_MAX_LINKS],
            attributes={
                "costmesh.queue.size": len(items),
                "costmesh.queue.wait_ms": max(0, round(waited * 1000)),
                "costmesh.queue.backend": self._settings.backend,
            },
        ) as span:
            batch = trace.Link(span.get_span_context())
            await asyncio.gather(*(self._run_item(item, batch) for item in items))

    async def _run_item(self, item: _Item, batch: trace.Link) -> None:
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

    async def _outcome(self, item: _Item, batch: trace.Link) -> Outcome:
        """The answer or the failure of one request, in a span of the submitter's trace
        (so one trace id still runs from SubmitBatch to the provider and the ledger)."""
        with self._tracer.start_as_current_span(
            "queue.request",
            context=_PROPAGATOR.extract(item.carrier),
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


def _distinct_contexts(carriers: Iterable[dict[str, str]]) -> list[trace.SpanContext]:
    seen: dict[tuple[int, int], trace.SpanContext] = {}
    for carrier in carriers:
        context = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
        if context.is_valid:
            seen.setdefault((context.trace_id, context.span_id), context)
    return list(seen.values())


def _deadline(first: _Item, max_wait: float, clock: Callable[[], float]) -> float:
    """The loop time by which a batch starting with `first` goes, full or not: max_wait
    after `first` was enqueued (now, if it has waited longer already)."""
    left = first.enqueued_at + max_wait - clock()
    return asyncio.get_running_loop().time() + min(max(left, 0.0), max_wait)


# -- memory ----------------------------------------------------------------------------


class _MemoryBackend:
    """This process's queue: a deque, and batches in a dict with their expiry times."""

    def __init__(self, ttl: int, max_waiting: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._max_waiting = max_waiting
        self._clock = clock
        self._waiting: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._batches: dict[str, _Batch] = {}
        self._expires: dict[str, float] = {}
        self._next_prune = 0.0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def enqueue(self, batch_id: str, batch: _Batch, items: Sequence[_Item]) -> None:
        self._prune()
        if len(self._waiting) + len(items) > self._max_waiting:
            raise ResourceExhausted(
                f"requests: the queue holds {len(self._waiting)} waiting requests and takes"
                f" at most {self._max_waiting}; retry later",
                reason="QUEUE_FULL",
            )
        self._batches[batch_id] = batch
        self._expires[batch_id] = self._clock() + self._ttl
        self._waiting.extend(items)
        self._arrived.set()

    async def take(self, max_batch: int, max_wait: float) -> list[_Item]:
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        items = [self._waiting.popleft()]
        deadline = _deadline(items[0], max_wait, self._clock)
        loop = asyncio.get_running_loop()
        while len(items) < max_batch:
            if self._waiting:
                items.append(self._waiting.popleft())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return items

    async def claim(self, item: _Item) -> bool:
        batch = self._batches.get(item.batch_id)
        if batch is not None:
            batch.started = True
            self._expires[item.batch_id] = self._clock() + self._ttl
        return True

    async def finish(self, item: _Item, outcome: Outcome) -> None:
        batch = self._batches.get(item.batch_id)
        if batch is not None:  # else it expired while it waited: nobody can read it
            batch.outcomes[item.caller_id] = outcome
            self._expires[item.batch_id] = self._clock() + self._ttl

    async def read(self, batch_id: str) -> _Batch | None:
        self._prune()
        expires = self._expires.get(batch_id)
        if expires is None or expires <= self._clock():
            return None
        return self._batches[batch_id]

    def _prune(self) -> None:
        now = self._clock()
        if now < self._next_prune:
            return
        self._next_prune = now + min(60.0, self._ttl)
        for batch_id in [b for b, at in self._expires.items() if at <= now]:
            del self._expires[batch_id], self._batches[batch_id]


# -- redis -----------------------------------------------------------------------------


class _RedisBackend:
    """A Redis stream read through a consumer group; see the module docstring."""

    def __init__(
        self,
        settings: QueueSettings,
        consumer: str | None,
        claim_idle_seconds: float,
        max_waiting: int,
        clock: Callable[[], float],
    ) -> None:
        prefix = settings.redis_prefix
        self._prefix = prefix
        self._stream = f"{prefix}:stream"
        self._ttl = settings.result_ttl_seconds
        self._max_waiting = max_waiting
        self._clock = clock
        self._data_dir = settings.data_dir
        self._consumer = consumer or ""
        self._claim_idle_ms = max(1, round(claim_idle_seconds * 1000))
        self._redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0, protocol=2
        )
        # Blocking reads get their own connection, with a timeout beyond the block.
        self._reader = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=5.0 + _BLOCK_MS / 1000,
            socket_connect_timeout=5.0,
            protocol=2,
        )
        self._held: dict[str, _Item] = {}  # entry id -> item read and not yet acked
        self._own_cursor: str | None = "0"  # own entries an earlier run left pending
        self._claim_cursor = "0-0"
        self._next_sweep = 0.0
        self._group_ready = False
        self._heartbeat: asyncio.Task[None] | None = None

    def _key(self, kind: str, batch_id: str) -> str:
        return f"{self._prefix}:{kind}:{batch_id}"

    async def start(self) -> None:
        if not self._consumer:
            self._consumer = await asyncio.to_thread(_consumer_name, self._data_dir)
        self._own_cursor = "0"
        try:
            await self._ensure_group()
        except RedisError as exc:  # the consumer keeps trying; the mesh still starts
            log.warning("micro-batch queue: Redis unavailable at start (%s)", exc)
        self._heartbeat = asyncio.create_task(self._keep_alive(), name="micro-batch-heartbeat")

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        self._held.clear()
        await self._reader.aclose()
        await self._redis.aclose()

    async def _ensure_group(self) -> None:
        try:
            # From the stream's start: entries added before any consumer existed count.
            await self._redis.xgroup_create(self._stream, _GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def enqueue(self, batch_id: str, batch: _Batch, items: Sequence[_Item]) -> None:
        waiting = int(await self._redis.xlen(self._stream))
        if waiting + len(items) > self._max_waiting:
            raise ResourceExhausted(
                f"requests: the queue holds {waiting} unanswered requests and takes at"
                f" most {self._max_waiting}; retry later",
                reason="QUEUE_FULL",
            )
        meta = self._key("batch", batch_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                meta,
                mapping={
                    "team": batch.team,
                    "total": batch.total,
                    "ids": json.dumps(batch.ids),
                    "created": repr(self._clock()),
                },
            )
            pipe.expire(meta, self._ttl)
            for item in items:
                pipe.xadd(self._stream, _encode_item(item))  # type: ignore[arg-type]
            await pipe.execute()

    async def take(self, max_batch: int, max_wait: float) -> list[_Item]:
        if not self._group_ready:
            await self._ensure_group()
        recovered = await self._recover(max_batch)
        if recovered:
            return recovered  # they have waited long enough
        loop = asyncio.get_running_loop()
        block = max(1, min(_BLOCK_MS, round((self._next_sweep - loop.time()) * 1000)))
        items = await self._read(">", max_batch, block)
        if not items:
            return []
        deadline = _deadline(items[0], max_wait, self._clock)
        while len(items) < max_batch:
            left_ms = round((deadline - loop.time()) * 1000)
            # Once the time is up, one more read without blocking takes what is there.
            items += await self._read(">", max_batch - len(items), left_ms if left_ms > 0 else None)
            if left_ms <= 0:
                break
        return items

    async def _recover(self, max_batch: int) -> list[_Item]:
        """Entries this consumer left pending when it stopped, then (now and then)
        entries of other consumers that have lain idle for claim_idle."""
        while self._own_cursor is not None:
            entries = await self._xreadgroup(self._own_cursor, max_batch, None)
            if not entries:
                self._own_cursor = None
                break
            self._own_cursor = _text(entries[-1][0])
            items = await self._accept(entries)
            if items:
                return items
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_sweep:
            return []
        self._next_sweep = loop.time() + self._claim_idle_ms / 2000
        reply = await self._redis.xautoclaim(
            self._stream,
            _GROUP,
            self._consumer,
            min_idle_time=self._claim_idle_ms,
            start_id=self._claim_cursor,
            count=max_batch,
        )
        self._claim_cursor = _text(reply[0])
        if self._claim_cursor != "0-0":
            self._next_sweep = loop.time()  # more to look at: soon again
        if len(reply) > 2 and reply[2]:  # deleted while pending: nothing to answer
            await self._redis.xack(self._stream, _GROUP, *reply[2])
        entries = [(i, f) for i, f in reply[1] if _text(i) not in self._held]
        if entries:
            log.info("micro-batch queue: took over %d abandoned requests", len(entries))
        return await self._accept(entries)

    async def _read(self, cursor: str, count: int, block: int | None) -> list[_Item]:
        return await self._accept(await self._xreadgroup(cursor, count, block))

    async def _xreadgroup(
        self, cursor: str, count: int, block: int | None
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        try:
            reply = await self._reader.xreadgroup(
                _GROUP, self._consumer, {self._stream: cursor}, count=count, block=block
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted (a flush): start over
                self._group_ready = False
                await self._ensure_group()
                return []
            raise
        streams: Any = reply
        return list(streams[0][1]) if streams else []

    async def _accept(self, entries: Sequence[tuple[Any, Any]]) -> list[_Item]:
        items, gone = [], []
        for entry_id, fields in entries:
            item = _decode_item(fields or {})
            if item is None:
                if fields:
                    log.error("micro-batch queue: dropping malformed entry %s", _text(entry_id))
                gone.append(entry_id)
                continue
            item.token = _text(entry_id)
            self._held[item.token] = item
            items.append(item)
        if gone:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(self._stream, _GROUP, *gone)
                pipe.xdel(self._stream, *gone)
                await pipe.execute()
        return items

    async def claim(self, item: _Item) -> bool:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hexists(self._key("results", item.batch_id), item.caller_id)
                pipe.set(self._key("started", item.batch_id), "1", ex=self._ttl)
                pipe.expire(self._key("batch", item.batch_id), self._ttl)
                stored = (await pipe.execute())[0]
            if stored:  # answered and stored, but the ack was lost: just ack it now
                await self._ack(item)
                return False
        except BaseException:
            self._held.pop(item.token, None)  # no longer kept alive: claimed again later
            raise
        return True

    async def finish(self, item: _Item, outcome: Outcome) -> None:
        results = self._key("results", item.batch_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(results, item.caller_id, _encode_outcome(outcome))
                for key in (results, self._key("batch", item.batch_id)):
                    pipe.expire(key, self._ttl)
                pipe.expire(self._key("started", item.batch_id), self._ttl)
                pipe.xack(self._stream, _GROUP, item.token)
                pipe.xdel(self._stream, item.token)
                await pipe.execute()
        finally:
            self._held.pop(item.token, None)

    async def _ack(self, item: _Item) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(self._stream, _GROUP, item.token)
                pipe.xdel(self._stream, item.token)
                await pipe.execute()
        finally:
            self._held.pop(item.token, None)

    async def read(self, batch_id: str) -> _Batch | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._key("batch", batch_id))
            pipe.hgetall(self._key("results", batch_id))
            pipe.exists(self._key("started", batch_id))
            meta, results, started = await pipe.execute()
        if not meta:
            return None
        batch = _Batch(
            team=meta[b"team"].decode(),
            total=int(meta[b"total"]),
            ids=json.loads(meta[b"ids"]),
            started=bool(started),
        )
        for caller_id, value in results.items():
            outcome = _decode_outcome(value)
            if outcome is not None:
                batch.outcomes[caller_id.decode()] = outcome
        return batch

    async def _keep_alive(self) -> None:
        """Re-claim held entries to this consumer so that none is taken over while it
        works on them (XCLAIM resets an entry's idle time)."""
        every = self._claim_idle_ms / 3000
        while True:
            await asyncio.sleep(every)
            held: list[StreamId] = list(self._held)
            if not held:
                continue
            try:
                await self._redis.xclaim(self._stream, _GROUP, self._consumer, 0, held, justid=True)
            except RedisError as exc:
                log.warning("micro-batch queue: could not keep %d entries (%s)", len(held), exc)


def _consumer_name(data_dir: Path) -> str:
    """This node's consumer name, kept in its data directory so that a restart finds
    the entries it left pending (and answers them with the same idempotency store)."""
    path = data_dir / _CONSUMER_FILE
    with contextlib.suppress(OSError):
        name = path.read_text().strip()
        if name:
            return name
    name = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(name + "\n")
    except OSError as exc:
        log.warning("micro-batch queue: cannot keep consumer name in %s (%s)", path, exc)
    return name


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _encode_item(item: _Item) -> dict[str, str | bytes]:
    return {
        "batch": item.batch_id,
        "id": item.caller_id,
        "team": item.principal.team,
        "role": item.principal.role,
        "at": repr(item.enqueued_at),
        "trace": json.dumps(item.carrier),
        "request": item.request.SerializeToString(),
    }


def _decode_item(fields: dict[bytes, bytes]) -> _Item | None:
    try:
        carrier = json.loads(fields[b"trace"])
        return _Item(
            batch_id=fields[b"batch"].decode(),
            caller_id=fields[b"id"].decode(),
            request=inference_pb2.CompleteRequest.FromString(fields[b"request"]),
            principal=Principal(fields[b"team"].decode(), fields[b"role"].decode()),
            enqueued_at=float(fields[b"at"]),
            carrier={str(k): str(v) for k, v in carrier.items()},
        )
    except (KeyError, ValueError, AttributeError):  # DecodeError is a ValueError too
        return None


def _encode_outcome(outcome: Outcome) -> bytes:
    tag = b"r" if isinstance(outcome, inference_pb2.CompleteResponse) else b"f"
    return tag + outcome.SerializeToString()


def _decode_outcome(value: bytes) -> Outcome | None:
    try:
        if value[:1] == b"r":
            return inference_pb2.CompleteResponse.FromString(value[1:])
        if value[:1] == b"f":
            return inference_pb2.BatchFailure.FromString(value[1:])
    except ValueError:
        pass
    log.error("micro-batch queue: unreadable stored result")
    return None
