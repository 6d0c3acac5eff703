"""The Redis backend: nothing enqueued is lost when a consumer stops or crashes
(see the package docstring for its keys)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError
from redis.typing import StreamIdT as StreamId

from services.common.errors import ResourceExhausted
from services.inference.queue.items import (
    BLOCK_MS,
    CONSUMER_FILE,
    GROUP,
    Batch,
    Item,
    Outcome,
    QueueSettings,
    batch_deadline,
    decode_item,
    decode_outcome,
    encode_item,
    encode_outcome,
    text,
)

log = logging.getLogger(__name__)


class RedisBackend:
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
            socket_timeout=5.0 + BLOCK_MS / 1000,
            socket_connect_timeout=5.0,
            protocol=2,
        )
        self._held: dict[str, Item] = {}  # entry id -> item read and not yet acked
        self._own_cursor: str | None = "0"  # own entries an earlier run left pending
        self._claim_cursor = "0-0"
        self._next_sweep = 0.0
        self._group_ready = False
        self._heartbeat: asyncio.Task[None] | None = None

    def _key(self, kind: str, batch_id: str) -> str:
        return f"{self._prefix}:{kind}:{batch_id}"

    async def start(self) -> None:
        if not self._consumer:
            self._consumer = await asyncio.to_thread(consumer_name, self._data_dir)
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
            await self._redis.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def enqueue(self, batch_id: str, batch: Batch, items: Sequence[Item]) -> None:
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
                pipe.xadd(self._stream, encode_item(item))  # type: ignore[arg-type]
            await pipe.execute()

    async def take(self, max_batch: int, max_wait: float) -> list[Item]:
        if not self._group_ready:
            await self._ensure_group()
        recovered = await self._recover(max_batch)
        if recovered:
            return recovered  # they have waited long enough
        loop = asyncio.get_running_loop()
        block = max(1, min(BLOCK_MS, round((self._next_sweep - loop.time()) * 1000)))
        items = await self._read(">", max_batch, block)
        if not items:
            return []
        deadline = batch_deadline(items[0], max_wait, self._clock)
        while len(items) < max_batch:
            left_ms = round((deadline - loop.time()) * 1000)
            # Once the time is up, one more read without blocking takes what is there.
            items += await self._read(">", max_batch - len(items), left_ms if left_ms > 0 else None)
            if left_ms <= 0:
                break
        return items

    async def _recover(self, max_batch: int) -> list[Item]:
        """Entries this consumer left pending when it stopped, then (now and then)
        entries of other consumers that have lain idle for claim_idle."""
        while self._own_cursor is not None:
            entries = await self._xreadgroup(self._own_cursor, max_batch, None)
            if not entries:
                self._own_cursor = None
                break
            self._own_cursor = text(entries[-1][0])
            items = await self._accept(entries)
            if items:
                return items
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_sweep:
            return []
        self._next_sweep = loop.time() + self._claim_idle_ms / 2000
        reply = await self._redis.xautoclaim(
            self._stream,
            GROUP,
            self._consumer,
            min_idle_time=self._claim_idle_ms,
            start_id=self._claim_cursor,
            count=max_batch,
        )
        self._claim_cursor = text(reply[0])
        if self._claim_cursor != "0-0":
            self._next_sweep = loop.time()  # more to look at: soon again
        if len(reply) > 2 and reply[2]:  # deleted while pending: nothing to answer
            await self._redis.xack(self._stream, GROUP, *reply[2])
        entries = [(i, f) for i, f in reply[1] if text(i) not in self._held]
        if entries:
            log.info("micro-batch queue: took over %d abandoned requests", len(entries))
        return await self._accept(entries)

    async def _read(self, cursor: str, count: int, block: int | None) -> list[Item]:
        return await self._accept(await self._xreadgroup(cursor, count, block))

    async def _xreadgroup(
        self, cursor: str, count: int, block: int | None
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        try:
            reply = await self._reader.xreadgroup(
                GROUP, self._consumer, {self._stream: cursor}, count=count, block=block
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted (a flush): start over
                self._group_ready = False
                await self._ensure_group()
                return []
            raise
        streams: Any = reply
        return list(streams[0][1]) if streams else []

    async def _accept(self, entries: Sequence[tuple[Any, Any]]) -> list[Item]:
        items, gone = [], []
        for entry_id, fields in entries:
            item = decode_item(fields or {})
            if item is None:
                if fields:
                    log.error("micro-batch queue: dropping malformed entry %s", text(entry_id))
                gone.append(entry_id)
                continue
            item.token = text(entry_id)
            self._held[item.token] = item
            items.append(item)
        if gone:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(self._stream, GROUP, *gone)
                pipe.xdel(self._stream, *gone)
                await pipe.execute()
        return items

    async def claim(self, item: Item) -> bool:
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

    async def finish(self, item: Item, outcome: Outcome) -> None:
        results = self._key("results", item.batch_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(results, item.caller_id, encode_outcome(outcome))
                for key in (results, self._key("batch", item.batch_id)):
                    pipe.expire(key, self._ttl)
                pipe.expire(self._key("started", item.batch_id), self._ttl)
                pipe.xack(self._stream, GROUP, item.token)
                pipe.xdel(self._stream, item.token)
                await pipe.execute()
        finally:
            self._held.pop(item.token, None)

    async def _ack(self, item: Item) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(self._stream, GROUP, item.token)
                pipe.xdel(self._stream, item.token)
                await pipe.execute()
        finally:
            self._held.pop(item.token, None)

    async def read(self, batch_id: str) -> Batch | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._key("batch", batch_id))
            pipe.hgetall(self._key("results", batch_id))
            pipe.exists(self._key("started", batch_id))
            meta, results, started = await pipe.execute()
        if not meta:
            return None
        batch = Batch(
            team=meta[b"team"].decode(),
            total=int(meta[b"total"]),
            ids=json.loads(meta[b"ids"]),
            started=bool(started),
        )
        for caller_id, value in results.items():
            outcome = decode_outcome(value)
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
                await self._redis.xclaim(self._stream, GROUP, self._consumer, 0, held, justid=True)
            except RedisError as exc:
                log.warning("micro-batch queue: could not keep %d entries (%s)", len(held), exc)


def consumer_name(data_dir: Path) -> str:
    """This node's consumer name, kept in its data directory so that a restart finds
    the entries it left pending (and answers them with the same idempotency store)."""
    path = data_dir / CONSUMER_FILE
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
