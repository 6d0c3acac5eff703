"""The cache's decisions: exact hash first, then the nearest question of the same
partition, served only above the feature's threshold and past the guard."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from opentelemetry import trace

from services.cache.guard import refusal
from services.cache.index import Vector
from services.cache.keys import RequestKey
from services.cache.store import Answer, Capacity, Entry, Store, StoreUnavailableError
from services.common.embedding import Embedder, EmbeddingUnavailableError
from services.common.errors import InvalidArgument
from services.common.outages import OutageLog

log = logging.getLogger(__name__)

# What the cache survives: an unreachable Redis or embeddings provider costs hits.
FAIL_OPEN = (StoreUnavailableError, EmbeddingUnavailableError)
# Candidates fetched per search: the best live one is judged, stale ones (expired
# or invalidated since the search) are skipped.
_CANDIDATES = 4


@dataclass(frozen=True)
class FeaturePolicy:
    """How one feature is cached ([features.X] cache_* keys)."""

    semantic: bool = True
    threshold: float = 0.94
    question_mode: str = "last_user"
    ttl_seconds: int = 3600
    capacity: Capacity = field(default_factory=lambda: Capacity(100_000))
    per_tenant: bool = False


@dataclass(frozen=True)
class LookupResult:
    outcome: str  # "exact", "semantic" or "miss"
    entry: Entry | None = None
    similarity: float = 0.0
    best_similarity: float = 0.0
    guard_rejection: str = ""
    vector: Vector | None = None
    embedding_tokens: int = 0  # billed by an embeddings provider
    version: int = 0  # the namespace version looked up
    looked_up_at: float = 0.0


class SemanticCache:
    """Lookup, store and invalidation over a Store, with per-feature counters."""

    def __init__(
        self,
        store: Store,
        embedder: Embedder | None,
        policies: dict[str, FeaturePolicy],
        clock: Callable[[], float] = time.time,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._tracer = tracer or trace.get_tracer(__name__)
        self.store = store
        self.embedder = embedder
        self._policies = policies
        self._clock = clock
        self.counters: Counter[tuple[str, str]] = Counter()
        self._outage = OutageLog(log, "cache backend (lookups miss, stores dropped)")

    def policy(self, key: RequestKey) -> FeaturePolicy:
        policy = self._policies.get(key.feature) or self._policies["default"]
        if policy.per_tenant and not key.scope_key:
            raise InvalidArgument(
                "key.scope_key", f"feature {key.feature!r} is cached per tenant: name the tenant"
            )
        return policy

    async def lookup(
        self, key: RequestKey, max_age_seconds: int = 0, threshold: float | None = None
    ) -> LookupResult:
        policy = self.policy(key)
        started = self._clock()
        try:
            result = replace(
                await self._find(key, policy, max_age_seconds, threshold), looked_up_at=started
            )
            self._outage.succeeded()
        except FAIL_OPEN as exc:
            self._failed(key.feature, exc)
            result = LookupResult("miss")
        counter = {"exact": "exact_hits", "semantic": "semantic_hits"}.get(result.outcome, "misses")
        self.counters[(key.feature, counter)] += 1
        if result.guard_rejection:
            self.counters[(key.feature, "guard_rejections")] += 1
        if result.entry is not None:
            try:
                await self.store.touch(result.entry)
            except FAIL_OPEN as exc:  # the hit stands; only its recency is lost
                self._failed(key.feature, exc)
        return result

    async def _find(
        self, key: RequestKey, policy: FeaturePolicy, max_age: int, threshold: float | None
    ) -> LookupResult:
        version = await self.store.version(key.feature, key.namespace)
        entry = await self.store.get(key.digest(version))
        if entry is not None and self._fresh(entry, max_age):
            return LookupResult("exact", entry, 1.0, 1.0, version=version)
        question = key.question(policy.question_mode)
        if not policy.semantic or self.embedder is None or not question:
            return LookupResult("miss", version=version)
        embedded = await self.embedder.embed([question])
        vector, tokens = embedded.vectors[0], embedded.input_tokens * self.embedder.billed
        if not embedded.whole(0):  # longer than the model reads: exact matches only
            return LookupResult("miss", embedding_tokens=tokens, version=version)
        result = await self._search(
            key,
            version=version,
            policy=policy,
            question=question,
            vector=vector,
            max_age=max_age,
            threshold=threshold,
        )
        return replace(result, embedding_tokens=tokens, version=version)

    async def _search(
        self,
        key: RequestKey,
        *,
        version: int,
        policy: FeaturePolicy,
        question: str,
        vector: Vector,
        max_age: int,
        threshold: float | None,
    ) -> LookupResult:
        model = self.embedder.model if self.embedder else ""
        partition = key.semantic_partition(version, policy.question_mode, model)
        with self._tracer.start_as_current_span("cache.search") as span:
            candidates = await self.store.nearest(partition, vector, _CANDIDATES)
            best = None
            for entry_id, similarity in candidates:
                found = await self.store.get(entry_id)
                if found is not None and self._fresh(found, max_age):
                    best = (found, similarity)
                    break
            span.set_attributes(
                {
                    "costmesh.cache.candidates": len(candidates),
                    "costmesh.cache.best_similarity": best[1] if best else 0.0,
                }
            )
        if best is None:
            return LookupResult("miss", vector=vector)
        found, similarity = best
        if similarity < (policy.threshold if threshold is None else threshold):
            return LookupResult("miss", best_similarity=similarity, vector=vector)
        rejection = refusal(question, found.question)
        if rejection:
            return LookupResult(
                "miss", best_similarity=similarity, guard_rejection=rejection, vector=vector
            )
        return LookupResult("semantic", found, similarity, similarity, vector=vector)

    def _fresh(self, entry: Entry, max_age: int) -> bool:
        now = self._clock()
        return entry.expires_at > now and (max_age <= 0 or now - entry.created_at <= max_age)

    async def put(
        self,
        key: RequestKey,
        answer: Answer,
        ttl_seconds: int,
        tags: tuple[str, ...],
        *,
        vector: Vector | None = None,
        seen_version: int = 0,
        looked_up_at: float = 0.0,
        source_request_id: str = "",
    ) -> Entry | None:
        """Store an answer; `vector` is the lookup's embedding of the same question,
        `seen_version` the namespace version that lookup saw and `looked_up_at` when,
        `source_request_id` the call that produced the answer (handed back on hits).

        None when the answer is dropped: the backend is down, or the namespace was
        bumped or one of its tags invalidated since the lookup (the answer may be
        made of what was invalidated)."""
        policy = self.policy(key)
        try:
            version = await self.store.version(key.feature, key.namespace)
            stale = seen_version and version != seen_version
            if not stale and looked_up_at and tags:
                stale = await self.store.tag_invalidated_after(key.feature, tags, looked_up_at)
            if stale:
                self.counters[(key.feature, "stale_stores")] += 1
                return None
            entry = await self._entry(
                key,
                policy,
                version=version,
                answer=answer,
                ttl_seconds=ttl_seconds,
                tags=tags,
                vector=vector,
                source_request_id=source_request_id,
            )
            await self.store.put(entry, policy.capacity)
        except FAIL_OPEN as exc:
            self._failed(key.feature, exc)
            return None
        self._outage.succeeded()
        self.counters[(key.feature, "stores")] += 1
        return entry

    async def _entry(
        self,
        key: RequestKey,
        policy: FeaturePolicy,
        *,
        version: int,
        answer: Answer,
        ttl_seconds: int,
        tags: tuple[str, ...],
        vector: Vector | None,
        source_request_id: str,
    ) -> Entry:
        question = key.question(policy.question_mode)
        if not policy.semantic or self.embedder is None or not question:
            vector = None
        elif vector is None:
            embedded = await self.embedder.embed([question])
            vector = embedded.vectors[0] if embedded.whole(0) else None
        model = self.embedder.model if self.embedder else ""
        now = self._clock()
        return Entry(
            entry_id=key.digest(version),
            feature=key.feature,
            namespace=key.namespace,
            partition=key.semantic_partition(version, policy.question_mode, model),
            question=question,
            answer=answer,
            created_at=now,
            expires_at=now + ttl_seconds,
            tags=tags,
            vector=vector,
            source_request_id=source_request_id,
        )

    def _failed(self, feature: str, exc: Exception) -> None:
        """A backend failure costs a hit or a store, never the call: log once, count."""
        self._outage.failed(str(exc))
        self.counters[(feature, "backend_failures")] += 1

    def stats(self, feature: str = "") -> dict[str, int | float]:
        """Counters of this replica, and entries and memory of the store."""
        names = (
            "exact_hits", "semantic_hits", "misses", "stores", "guard_rejections",
            "backend_failures", "evictions", "expirations", "invalidations", "stale_stores",
        )  # fmt: skip
        sources = (self.counters, self.store.counters)
        totals: dict[str, int | float] = {
            name: sum(
                n
                for counters in sources
                for (f, counter), n in counters.items()
                if counter == name and (not feature or f == feature)
            )
            for name in names
        }
        hits = int(totals["exact_hits"]) + int(totals["semantic_hits"])
        lookups = hits + int(totals["misses"])
        totals["hit_rate"] = hits / lookups if lookups else 0.0
        totals["entries"] = self.store.entries(feature)
        totals["memory_bytes"] = self.store.memory_bytes(feature)
        return totals
