"""Cache entries and the in-process store: absolute TTLs, LRU per namespace, tags,
namespace versions and one vector index per semantic partition."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from services.cache.index import ExpiryQueue, PartitionedIndex, Vector

# What one entry costs beyond its own strings and float32 vector: its Python objects,
# the bookkeeping maps and its share of an HNSW graph. bench/semantic_lookup.py saw
# the cache process grow by 358 MiB for 100,000 entries (3.7 KB each) with short
# answers; this makes the accounted figure match that.
ENTRY_OVERHEAD_BYTES = 1900


class StoreUnavailableError(Exception):
    """The backend (Redis) cannot be reached: lookups miss and stores are dropped."""


@dataclass(frozen=True)
class Answer:
    """What is cached for a request."""

    content: str
    model: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    finish_reason: str


@dataclass
class Entry:
    entry_id: str
    feature: str
    namespace: str
    partition: str  # the semantic partition the vector lives in
    question: str
    answer: Answer
    created_at: float
    expires_at: float
    tags: tuple[str, ...] = field(default_factory=tuple)
    vector: Vector | None = None
    # The request id of the call whose answer this is ("" when not given or stored
    # before entries carried it): a hit hands it back, so a false hit can be traced.
    source_request_id: str = ""

    @property
    def nbytes(self) -> int:
        """Memory accounted to the entry: its text, ids, tags and vector."""
        text = (
            self.answer.content,
            self.answer.model,
            self.question,
            self.entry_id,
            self.partition,
            self.source_request_id,
            *self.tags,
        )
        vector = 0 if self.vector is None else int(self.vector.nbytes)
        return ENTRY_OVERHEAD_BYTES + sum(len(t.encode()) for t in text) + vector


@dataclass(frozen=True)
class Capacity:
    """Bounds of one namespace; the least recently used entries go first."""

    max_entries: int
    max_bytes: int = 0  # zero: bounded by entries only


class Store(Protocol):
    """Where entries live: this process (MemoryStore) or Redis (RedisStore)."""

    counters: Counter[tuple[str, str]]

    async def start(self) -> None: ...

    async def version(self, feature: str, namespace: str) -> int: ...

    async def get(self, entry_id: str) -> Entry | None: ...

    async def nearest(self, partition: str, vector: Vector, k: int) -> list[tuple[str, float]]: ...

    async def touch(self, entry: Entry) -> None: ...

    async def put(self, entry: Entry, capacity: Capacity) -> None: ...

    async def invalidate_tag(self, feature: str, tag: str) -> int: ...

    async def tag_invalidated_after(self, feature: str, tags: tuple[str, ...], when: float) -> bool:
        """True when one of the tags was invalidated after `when` (epoch seconds)."""

    async def bump(self, feature: str, namespace: str) -> tuple[int, int]: ...

    async def remove(self, entry: Entry) -> None:
        """Drop one entry (a reported wrong answer)."""

    async def bar(self, partition: str) -> float:
        """The similarity a semantic hit of the partition must reach at least, learned
        from reported wrong hits; 0 when none was reported."""

    async def raise_bar(self, partition: str, similarity: float) -> float:
        """Raise the partition's bar to `similarity` unless it is higher; the bar now."""

    def entries(self, feature: str = "") -> int: ...

    def memory_bytes(self, feature: str = "") -> int: ...

    async def close(self) -> None: ...


class MemoryStore:
    """All entries in this process. Not thread-safe: one event loop owns it."""

    def __init__(
        self, dimensions: int, ann_threshold: int = 0, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self._entries: dict[str, Entry] = {}
        self._lru: defaultdict[tuple[str, str], OrderedDict[str, None]] = defaultdict(OrderedDict)
        self._bytes: Counter[tuple[str, str]] = Counter()
        self._sizes: dict[str, int] = {}  # accounted when stored (the vector goes to the index)
        self._index = PartitionedIndex(dimensions, ann_threshold)
        self._tags: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
        self._versions: dict[tuple[str, str], int] = {}
        self._tag_invalidated: dict[tuple[str, str], float] = {}
        self._bars: dict[str, float] = {}
        self._expiry = ExpiryQueue()
        self.counters: Counter[tuple[str, str]] = Counter()

    async def start(self) -> None:
        """Nothing to load: a new process starts empty."""

    async def version(self, feature: str, namespace: str) -> int:
        return self._versions.get((feature, namespace), 1)

    async def get(self, entry_id: str) -> Entry | None:
        self._reclaim_expired()
        return self._entries.get(entry_id)

    async def nearest(self, partition: str, vector: Vector, k: int) -> list[tuple[str, float]]:
        self._reclaim_expired()
        return self._index.search(partition, vector, k)

    async def touch(self, entry: Entry) -> None:
        lru = self._lru.get((entry.feature, entry.namespace))
        if lru is not None and entry.entry_id in lru:
            lru.move_to_end(entry.entry_id)

    async def put(self, entry: Entry, capacity: Capacity) -> None:
        self._reclaim_expired()
        self._remove(entry.entry_id)
        namespace = (entry.feature, entry.namespace)
        # The index keeps the vector: the entry map keeps one copy of it, not two.
        self._entries[entry.entry_id] = replace(entry, vector=None)
        self._lru[namespace][entry.entry_id] = None
        self._sizes[entry.entry_id] = entry.nbytes
        self._bytes[namespace] += entry.nbytes
        for tag in entry.tags:
            self._tags[(entry.feature, tag)].add(entry.entry_id)
        if entry.vector is not None:
            self._index.add(entry.partition, entry.entry_id, entry.vector)
        self._expiry.push(entry.expires_at, entry.entry_id)
        if len(self._expiry) > 2 * len(self._entries) + 1024:
            self._expiry.compact(self._expires_at)
        lru = self._lru[namespace]
        while len(lru) > capacity.max_entries or (
            capacity.max_bytes and self._bytes[namespace] > capacity.max_bytes and len(lru) > 1
        ):
            oldest = next(iter(lru))
            self._remove(oldest)
            self.counters[(entry.feature, "evictions")] += 1

    async def invalidate_tag(self, feature: str, tag: str) -> int:
        self._tag_invalidated[(feature, tag)] = self._clock()
        doomed = self._tags.pop((feature, tag), set())
        removed = sum(1 for entry_id in doomed if self._remove(entry_id))
        self.counters[(feature, "invalidations")] += removed
        return removed

    async def tag_invalidated_after(self, feature: str, tags: tuple[str, ...], when: float) -> bool:
        return any(self._tag_invalidated.get((feature, tag), 0.0) > when for tag in tags)

    async def bump(self, feature: str, namespace: str) -> tuple[int, int]:
        """Make every entry of the namespace unreachable at once, and reclaim them."""
        version = self._versions.get((feature, namespace), 1) + 1
        self._versions[(feature, namespace)] = version
        doomed = list(self._lru.get((feature, namespace), ()))
        for entry_id in doomed:
            self._remove(entry_id)
        self.counters[(feature, "invalidations")] += len(doomed)
        return len(doomed), version

    async def remove(self, entry: Entry) -> None:
        self._remove(entry.entry_id)

    async def bar(self, partition: str) -> float:
        return self._bars.get(partition, 0.0)

    async def raise_bar(self, partition: str, similarity: float) -> float:
        self._bars[partition] = max(self._bars.get(partition, 0.0), similarity)
        return self._bars[partition]

    def entries(self, feature: str = "") -> int:
        return sum(len(lru) for (f, _), lru in self._lru.items() if not feature or f == feature)

    def memory_bytes(self, feature: str = "") -> int:
        return sum(n for (f, _), n in self._bytes.items() if not feature or f == feature)

    async def close(self) -> None:
        """Nothing to release: the entries go with the process."""

    def _remove(self, entry_id: str) -> bool:
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return False
        namespace = (entry.feature, entry.namespace)
        lru = self._lru[namespace]
        lru.pop(entry_id, None)
        self._bytes[namespace] -= self._sizes.pop(entry_id)
        if not lru:
            del self._lru[namespace]
            del self._bytes[namespace]
        for tag in entry.tags:
            tagged = self._tags.get((entry.feature, tag))
            if tagged is not None:
                tagged.discard(entry_id)
                if not tagged:
                    del self._tags[(entry.feature, tag)]
        self._index.remove(entry.partition, entry_id)
        return True

    def _expires_at(self, expires_at: float, entry_id: str) -> bool:
        """True when the queue item is the entry's current expiry (not a stale one)."""
        held = self._entries.get(entry_id)
        return held is not None and held.expires_at == expires_at

    def _reclaim_expired(self) -> None:
        """Drop entries whose TTL passed (a heap by expiry; stale heap items skip)."""
        for expires_at, entry_id in self._expiry.due(self._clock()):
            if self._expires_at(expires_at, entry_id):
                feature = self._entries[entry_id].feature
                self._remove(entry_id)
                self.counters[(feature, "expirations")] += 1
