"""In-process exact-match store: absolute TTLs, LRU bound, tags, namespace versions."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from services.cache.keys import RequestKey


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
    answer: Answer
    created_at: float
    expires_at: float
    tags: tuple[str, ...] = field(default_factory=tuple)


class ExactStore:
    """Bounded map from request digest to entry. Not thread-safe: one event loop owns it."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._versions: dict[tuple[str, str], int] = {}
        self.counters: Counter[tuple[str, str]] = Counter()

    def version(self, feature: str, namespace: str) -> int:
        return self._versions.get((feature, namespace), 1)

    def lookup(self, key: RequestKey, max_age_seconds: int = 0) -> Entry | None:
        """The live entry for the key, or None; a hit refreshes recency, never expiry."""
        entry_id = key.digest(self.version(key.feature, key.namespace))
        entry = self._entries.get(entry_id)
        now = self._clock()
        if entry is not None and entry.expires_at <= now:
            del self._entries[entry_id]
            self.counters[(key.feature, "expirations")] += 1
            entry = None
        if entry is not None and max_age_seconds > 0 and now - entry.created_at > max_age_seconds:
            entry = None
        self.counters[(key.feature, "exact_hits" if entry else "misses")] += 1
        if entry is not None:
            self._entries.move_to_end(entry_id)
        return entry

    def store(
        self, key: RequestKey, answer: Answer, ttl_seconds: int, tags: tuple[str, ...]
    ) -> Entry:
        now = self._clock()
        entry = Entry(
            entry_id=key.digest(self.version(key.feature, key.namespace)),
            feature=key.feature,
            namespace=key.namespace,
            answer=answer,
            created_at=now,
            expires_at=now + ttl_seconds,
            tags=tags,
        )
        self._entries[entry.entry_id] = entry
        self._entries.move_to_end(entry.entry_id)
        self.counters[(key.feature, "stores")] += 1
        while len(self._entries) > self._max_entries:
            _, evicted = self._entries.popitem(last=False)
            self.counters[(evicted.feature, "evictions")] += 1
        return entry

    def invalidate_tag(self, feature: str, tag: str) -> int:
        doomed = [
            e.entry_id for e in self._entries.values() if e.feature == feature and tag in e.tags
        ]
        for entry_id in doomed:
            del self._entries[entry_id]
        return len(doomed)

    def bump_namespace(self, feature: str, namespace: str) -> tuple[int, int]:
        """Make every entry of the namespace unreachable at once, and reclaim them."""
        old = self.version(feature, namespace)
        self._versions[(feature, namespace)] = old + 1
        doomed = [
            e.entry_id
            for e in self._entries.values()
            if e.feature == feature and e.namespace == namespace
        ]
        for entry_id in doomed:
            del self._entries[entry_id]
        return len(doomed), old + 1

    def count(self, feature: str = "") -> int:
        return sum(1 for e in self._entries.values() if not feature or e.feature == feature)
