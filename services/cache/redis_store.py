"""Entries in Redis, shared by every cache replica and kept across restarts.

Redis 7 has no vector search, so each replica mirrors the vectors in its own
VectorIndex and follows a stream of put/delete events (its own included). A
replica that starts, or that lost Redis for a while, rebuilds its mirror from a
scan of the entries and then follows the stream from the last event it saw before
the scan, so nothing that happened during the scan is missed. A replica that finds
events it has not applied gone (it fell more than `stream_length` events behind, or
Redis was flushed) rebuilds the same way. Redis errors raise StoreUnavailableError:
the cache turns them into misses and dropped stores. Capacity is bounded in entries
per namespace; bound bytes with Redis's own maxmemory.

Keys, under the configured prefix P:
  P:e:<entry id>    hash: "m" JSON metadata and answer, "v" the float32 vector;
                    expires with the entry (PEXPIREAT), so TTLs are Redis's own.
                    New fields go at the top level of "m", never inside "answer"
                    (read as Answer(**...)): an older replica ignores a field it
                    does not know, and one missing from an older entry reads as
                    empty (source_request_id)
  P:ns:<hash>       sorted set of a namespace's entry ids by last use (LRU bound)
  P:tag:<hash>      set of the entry ids carrying a tag
  P:versions        hash of (feature, namespace) -> number of bumps
  P:tag_invalidated hash of (feature, tag) -> when it was last invalidated
  P:events          stream of put/del events, trimmed to about `stream_length`
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.cache.index import ExpiryQueue, PartitionedIndex, Vector
from services.cache.redis_codec import (
    Mirrored,
    entry_from,
    entry_meta,
    event_order,
    glob_escape,
    hash_field,
    mirror_meta,
    short_hash,
    vector_bytes,
)
from services.cache.store import Capacity, Entry, StoreUnavailableError
from services.common.outages import OutageLog

log = logging.getLogger(__name__)
_FOLLOW_BLOCK_MS = 1000
_ENTRY_ID = re.compile(r"[0-9a-f]{64}")  # a SHA-256 hex digest (keys.py)
_RECONNECT_SECONDS = 0.5
_GAP_CHECK_SECONDS = 2.0


class RedisStore:
    """The Store protocol over Redis, with a local mirror of the vectors."""

    def __init__(
        self,
        url: str,
        prefix: str,
        dimensions: int,
        *,
        ann_threshold: int = 0,
        stream_length: int = 200_000,
        timeout: float = 1.0,
    ) -> None:
        self._prefix = prefix
        self._dimensions = dimensions
        self._stream_length = stream_length
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, protocol=2
        )
        # XREAD blocks, so the follower gets its own connection and a longer timeout.
        self._follower = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout + _FOLLOW_BLOCK_MS / 1000,
            socket_connect_timeout=timeout,
            protocol=2,
        )
        self._mirror: dict[str, Mirrored] = {}
        self._index = PartitionedIndex(dimensions, ann_threshold)
        self._expiry = ExpiryQueue()
        self._last_event = b"0-0"
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._gap_checked = 0.0
        self._synced = asyncio.Event()
        self._progress = asyncio.Event()
        self._outage = OutageLog(log, "cache mirror of Redis (rebuilt when Redis returns)")
        self.counters: Counter[tuple[str, str]] = Counter()

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Follow the event stream; the first rebuild is awaited when Redis is up."""
        self._task = asyncio.create_task(self._follow())
        synced = asyncio.create_task(self._synced.wait())
        done, _ = await asyncio.wait(
            {self._task, synced}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED
        )
        synced.cancel()
        if self._task in done:
            self._task.result()  # a bug in the follower: surface it at start

    async def close(self) -> None:
        # A flag as well as the cancel: redis-py may turn the CancelledError that
        # interrupts a blocked XREAD into a connection error the loop would survive.
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._redis.aclose()
        await self._follower.aclose()

    async def caught_up(self) -> None:
        """Wait until the mirror has applied every event written so far."""
        last = await self._call(self._redis.xrevrange(self._key("events"), count=1))
        target = event_order(last[0][0]) if last else (0, 0)
        while not self._synced.is_set() or event_order(self._last_event) < target:
            self._progress.clear()
            await self._progress.wait()

    # -- the Store protocol ---------------------------------------------------------

    async def version(self, feature: str, namespace: str) -> int:
        bumps = await self._call(
            self._redis.hget(self._key("versions"), hash_field(feature, namespace))
        )
        return int(bumps or 0) + 1

    async def get(self, entry_id: str) -> Entry | None:
        meta = await self._call(self._redis.hget(self._entry_key(entry_id), "m"))
        if meta is None:
            return None
        return entry_from(entry_id, json.loads(meta))

    async def nearest(self, partition: str, vector: Vector, k: int) -> list[tuple[str, float]]:
        self._reclaim_expired()
        return self._index.search(partition, vector, k)

    async def touch(self, entry: Entry) -> None:
        await self._call(
            self._redis.zadd(
                self._ns_key(entry.feature, entry.namespace), {entry.entry_id: time.time()}, xx=True
            )
        )

    async def put(self, entry: Entry, capacity: Capacity) -> None:
        ns_key = self._ns_key(entry.feature, entry.namespace)
        expires_ms = int(entry.expires_at * 1000)
        meta = entry_meta(entry)
        pipe = self._redis.pipeline(transaction=True)
        entry_key = self._entry_key(entry.entry_id)
        pipe.delete(entry_key)
        pipe.hset(entry_key, mapping={"m": meta, "v": vector_bytes(entry.vector)})
        pipe.pexpireat(entry_key, expires_ms)
        pipe.zadd(ns_key, {entry.entry_id: time.time()})
        for tag in entry.tags:
            tag_key = self._tag_key(entry.feature, tag)
            pipe.sadd(tag_key, entry.entry_id)
            pipe.pexpireat(tag_key, expires_ms, nx=True)
            pipe.pexpireat(tag_key, expires_ms, gt=True)
        pipe.xadd(self._key("events"), self._put_event(entry), maxlen=self._stream_length)
        pipe.zcard(ns_key)
        results = await self._call(pipe.execute())
        excess = int(results[-1]) - capacity.max_entries
        if excess > 0:
            await self._evict(entry.feature, ns_key, excess)

    async def invalidate_tag(self, feature: str, tag: str) -> int:
        tag_key = self._tag_key(feature, tag)
        pipe = self._redis.pipeline(transaction=True)  # read and drop the set at once
        pipe.smembers(tag_key)
        pipe.delete(tag_key)
        pipe.hset(self._key("tag_invalidated"), hash_field(feature, tag), time.time())
        members, _, _ = await self._call(pipe.execute())
        removed = await self._delete(feature, [i.decode() for i in members])
        self.counters[(feature, "invalidations")] += removed
        return removed

    async def tag_invalidated_after(self, feature: str, tags: tuple[str, ...], when: float) -> bool:
        if not tags:
            return False
        fields = [hash_field(feature, tag) for tag in tags]
        times = await self._call(self._redis.hmget(self._key("tag_invalidated"), fields))
        return any(t is not None and float(t) > when for t in times)

    async def bump(self, feature: str, namespace: str) -> tuple[int, int]:
        """Every replica's lookups use the new version at once; old entries are reclaimed."""
        ns_key = self._ns_key(feature, namespace)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(self._key("versions"), hash_field(feature, namespace), 1)
        pipe.zrange(ns_key, 0, -1)
        pipe.delete(ns_key)
        bumps, members, _ = await self._call(pipe.execute())
        removed = await self._delete(feature, [i.decode() for i in members])
        self.counters[(feature, "invalidations")] += removed
        return removed, int(bumps) + 1

    async def remove(self, entry: Entry) -> None:
        await self._delete(entry.feature, [entry.entry_id])

    async def bar(self, partition: str) -> float:
        score = await self._call(self._redis.zscore(self._key("bars"), partition))
        return float(score or 0.0)

    async def raise_bar(self, partition: str, similarity: float) -> float:
        """ZADD GT: every replica raises, none lowers, whatever the order of reports."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.zadd(self._key("bars"), {partition: similarity}, gt=True)
        pipe.zscore(self._key("bars"), partition)
        _, score = await self._call(pipe.execute())
        return float(score)

    def entries(self, feature: str = "") -> int:
        self._reclaim_expired()
        return sum(1 for m in self._mirror.values() if not feature or m.feature == feature)

    def memory_bytes(self, feature: str = "") -> int:
        self._reclaim_expired()
        return sum(m.nbytes for m in self._mirror.values() if not feature or m.feature == feature)

    # -- writes -------------------------------------------------------------------

    async def _evict(self, feature: str, ns_key: str, excess: int) -> None:
        popped = await self._call(self._redis.zpopmin(ns_key, excess))
        ids = [entry_id.decode() for entry_id, _ in popped]
        # An id whose entry already expired is not an eviction: Redis dropped it.
        self.counters[(feature, "evictions")] += await self._delete(feature, ids)

    async def _delete(self, feature: str, ids: list[str]) -> int:
        """Delete entries, drop them from the tag sets this replica knows them in, and
        announce it; returns how many still existed."""
        if not ids:
            return 0
        pipe = self._redis.pipeline(transaction=True)
        for entry_id in ids:
            pipe.delete(self._entry_key(entry_id))
        for entry_id in ids:
            item = self._mirror.get(entry_id)
            if item is not None:
                for tag in item.tags:
                    pipe.srem(self._tag_key(item.feature, tag), entry_id)
        for entry_id in ids:
            pipe.xadd(
                self._key("events"), {"op": "del", "id": entry_id}, maxlen=self._stream_length
            )
        results = await self._call(pipe.execute())
        return sum(int(r) for r in results[: len(ids)])

    # -- the mirror ------------------------------------------------------------------

    async def _follow(self) -> None:
        rebuild = True
        while not self._closing:
            try:
                if rebuild:
                    await self._rebuild()
                    rebuild = False
                    self._synced.set()
                    self._progress.set()
                    self._outage.succeeded()
                if await self._missed_events():
                    log.warning(
                        "cache mirror missed events (stream trimmed or flushed); rebuilding"
                    )
                    rebuild = True
                    continue
                reply: Any = await self._follower.xread(
                    {self._key("events"): self._last_event}, count=1000, block=_FOLLOW_BLOCK_MS
                )
                for _, events in reply or ():
                    for event_id, fields in events:
                        self._apply(fields)
                        self._last_event = event_id
                self._progress.set()
            except (RedisError, OSError) as exc:
                # Events may be lost while Redis is away (or Redis itself restarted
                # empty): the mirror is rebuilt from what Redis holds when it returns.
                self._outage.failed(type(exc).__name__)
                rebuild = True
            except Exception:  # a malformed event must not stop the mirror for good
                log.exception("cache mirror: unexpected error; rebuilding from Redis")
                rebuild = True
            if rebuild:
                self._synced.clear()
                await asyncio.sleep(_RECONNECT_SECONDS)

    async def _missed_events(self) -> bool:
        """True when events this mirror has not applied are gone: trimmed from the
        stream (it fell too far behind) or the stream itself (Redis flushed or
        restarted empty). Checked every couple of seconds, not on every read."""
        now = time.monotonic()
        if now - self._gap_checked < _GAP_CHECK_SECONDS or self._last_event == b"0-0":
            return False
        self._gap_checked = now
        first: Any = await self._follower.xrange(self._key("events"), count=1)
        return not first or event_order(first[0][0]) > event_order(self._last_event)

    async def _rebuild(self) -> None:
        last: Any = await self._follower.xrevrange(self._key("events"), count=1)
        self._last_event = last[0][0] if last else b"0-0"
        self._mirror.clear()
        self._index.clear()
        self._expiry.clear()
        pattern = glob_escape(self._prefix) + ":e:*"
        async for key in self._follower.scan_iter(match=pattern, count=1000):
            entry_id = key.decode()[len(self._entry_key("")) :]
            if not _ENTRY_ID.fullmatch(entry_id):
                continue  # another prefix's key that the glob also matched ("p:e" vs "p")
            values: Any = await self._follower.hmget(key, ["m", "v"])
            meta, vector = values
            if meta is None:
                continue  # expired since the scan listed it
            self._mirror_put(entry_id, json.loads(meta), vector)

    def _apply(self, fields: dict[bytes, bytes]) -> None:
        entry_id = fields[b"id"].decode()
        if fields[b"op"] == b"del":
            self._mirror_remove(entry_id)
            return
        self._mirror_put(entry_id, json.loads(fields[b"m"]), fields.get(b"v"))

    def _mirror_put(self, entry_id: str, meta: dict[str, Any], vector: bytes | None) -> None:
        self._mirror_remove(entry_id)
        if meta["expires_at"] <= time.time():
            return
        item = Mirrored(
            meta["partition"],
            meta["feature"],
            meta["namespace"],
            meta["expires_at"],
            meta["nbytes"],
            tuple(meta["tags"]),
        )
        self._mirror[entry_id] = item
        if vector and len(vector) == 4 * self._dimensions:
            self._index.add(item.partition, entry_id, np.frombuffer(vector, dtype=np.float32))
        elif vector:  # another embedding model's entry (a config change): exact hits only
            self.counters[(item.feature, "foreign_vectors")] += 1
        self._expiry.push(item.expires_at, entry_id)
        if len(self._expiry) > 2 * len(self._mirror) + 1024:
            self._expiry.compact(self._expires_at)

    def _mirror_remove(self, entry_id: str) -> None:
        item = self._mirror.pop(entry_id, None)
        if item is not None:
            self._index.remove(item.partition, entry_id)

    def _expires_at(self, expires_at: float, entry_id: str) -> bool:
        """True when the queue item is the entry's current expiry (not a stale one)."""
        held = self._mirror.get(entry_id)
        return held is not None and held.expires_at == expires_at

    def _reclaim_expired(self) -> None:
        for expires_at, entry_id in self._expiry.due(time.time()):
            if self._expires_at(expires_at, entry_id):
                feature = self._mirror[entry_id].feature
                self._mirror_remove(entry_id)
                self.counters[(feature, "expirations")] += 1

    # -- helpers ---------------------------------------------------------------------

    def _put_event(self, entry: Entry) -> dict[Any, Any]:
        return {
            "op": "put",
            "id": entry.entry_id,
            "m": mirror_meta(entry),
            "v": vector_bytes(entry.vector),
        }

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise StoreUnavailableError(f"redis: {type(exc).__name__}: {exc}") from exc

    def _key(self, name: str) -> str:
        return f"{self._prefix}:{name}"

    def _entry_key(self, entry_id: str) -> str:
        return f"{self._prefix}:e:{entry_id}"

    def _ns_key(self, feature: str, namespace: str) -> str:
        return f"{self._prefix}:ns:{short_hash(hash_field(feature, namespace))}"

    def _tag_key(self, feature: str, tag: str) -> str:
        return f"{self._prefix}:tag:{short_hash(hash_field(feature, tag))}"
