"""The cache's decisions: exact hash first, then the nearest question of the same
partition, served only above the threshold and past the guard.

The threshold is an operating point, not a magic number: the feature names the
false hits per served hit it accepts (`cache_target_false_hit_rate`, default 1%) and
the equivalence model's card gives the threshold calibrated for that budget on
validation data. A reported wrong hit (`report_wrong_hit`) drops the entry and
raises its partition's bar above the similarity it was served at, so the same
mistake is not made twice there."""

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
from services.common.config import ConfigError
from services.common.embedding import Embedder, EmbeddingUnavailableError
from services.common.errors import InvalidArgument, NotFound
from services.common.outages import OutageLog

log = logging.getLogger(__name__)

# What the cache survives: an unreachable Redis or embeddings provider costs hits.
FAIL_OPEN = (StoreUnavailableError, EmbeddingUnavailableError)
# Candidates fetched per search: live ones above the threshold are judged by the
# guard in turn; stale ones (expired or invalidated since the search) are skipped.
_CANDIDATES = 4
DEFAULT_TARGET = 0.01  # false hits per served hit
# How far above a reported wrong hit's similarity its partition's bar goes.
BAR_MARGIN = 0.005


@dataclass(frozen=True)
class FeaturePolicy:
    """How one feature is cached ([features.X] cache_* keys)."""

    semantic: bool = True
    threshold: float | None = None  # None: the model's, for target_false_hit_rate
    target_false_hit_rate: float = DEFAULT_TARGET
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
    threshold: float = 0.0  # the bar the best candidate had to clear


@dataclass(frozen=True)
class WrongHit:
    """What a report of a wrong answer changed."""

    similarity: float  # of the reported question to the entry's (1 for an exact hit)
    partition_threshold: float  # the bar the partition's semantic hits must clear now


def calibrated_threshold(thresholds: dict[str, float], target: float) -> float | None:
    """The model's threshold for the largest calibrated budget within `target`."""
    within = [
        (float(budget), value) for budget, value in thresholds.items() if float(budget) <= target
    ]
    return max(within)[1] if within else None


def resolve_policies(
    policies: dict[str, FeaturePolicy], embedder: Embedder | None
) -> dict[str, FeaturePolicy]:
    """Every semantic feature's threshold, from its budget and the model's card; a
    model without calibration needs a threshold set by hand (measure it first)."""
    resolved = {}
    for name, policy in policies.items():
        if policy.threshold is None and policy.semantic and embedder is not None:
            calibrated = calibrated_threshold(embedder.thresholds, policy.target_false_hit_rate)
            if calibrated is None:
                budgets = ", ".join(sorted(embedder.thresholds)) or "none"
                raise ConfigError(
                    f"features.{name}.cache_target_false_hit_rate: {embedder.model} is "
                    f"calibrated for budgets {budgets}; set cache_similarity_threshold "
                    "(costmesh cache eval measures one)"
                )
            resolved[name] = replace(policy, threshold=calibrated)
        else:
            resolved[name] = policy
    return resolved


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
        self._policies = resolve_policies(policies, embedder)
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
        """The nearest live candidates in order, each past the bar and the guard in
        turn: a candidate the guard refuses is not yet a miss if the next one passes."""
        partition = key.semantic_partition(version, policy.question_mode, self._model())
        bar = (policy.threshold if threshold is None else threshold) or 0.0
        best = 0.0
        rejection = ""
        with self._tracer.start_as_current_span("cache.search") as span:
            candidates = await self.store.nearest(partition, vector, _CANDIDATES)
            span.set_attribute("costmesh.cache.candidates", len(candidates))
            checked_bar = False
            for entry_id, similarity in candidates:
                if similarity < bar:
                    break
                found = await self.store.get(entry_id)
                if found is None or not self._fresh(found, max_age):
                    continue  # expired or invalidated since the search
                best = best or similarity
                if not checked_bar:  # a learned bar matters only once a hit is near
                    checked_bar = True
                    bar = max(bar, await self.store.bar(partition))
                    if similarity < bar:
                        break
                why = refusal(question, found.question)
                rejection = rejection or why
                if not why:
                    span.set_attribute("costmesh.cache.best_similarity", best)
                    return LookupResult(
                        "semantic",
                        found,
                        similarity,
                        best,
                        guard_rejection=rejection,  # why a nearer candidate was passed over
                        vector=vector,
                        threshold=bar,
                    )
            best = best or (candidates[0][1] if candidates else 0.0)
            span.set_attribute("costmesh.cache.best_similarity", best)
        return LookupResult(
            "miss", best_similarity=best, guard_rejection=rejection, vector=vector, threshold=bar
        )

    def _model(self) -> str:
        return self.embedder.model if self.embedder else ""

    async def report_wrong_hit(self, key: RequestKey, entry_id: str) -> WrongHit:
        """A caller found the answer served for `key` wrong: drop the entry and, for a
        semantic hit, raise the partition's bar above the similarity it was served at.
        NotFound when the entry is gone or is not one `key` could have been served."""
        policy = self.policy(key)
        try:
            version = await self.store.version(key.feature, key.namespace)
            entry = await self.store.get(entry_id)
            partition = key.semantic_partition(version, policy.question_mode, self._model())
            exact = entry_id == key.digest(version)
            if entry is None or not (exact or entry.partition == partition):
                raise NotFound(
                    f"cache entry {entry_id!r} is gone (expired, evicted, invalidated or "
                    "already reported) or never answered this request"
                )
            similarity = 1.0 if exact else await self._similarity(key, policy, entry)
            await self.store.remove(entry)
            bar = await self.store.bar(partition)
            if not exact:
                bar = await self.store.raise_bar(partition, min(1.0, similarity + BAR_MARGIN))
        except FAIL_OPEN as exc:
            self._failed(key.feature, exc)
            raise
        self.counters[(key.feature, "wrong_hit_reports")] += 1
        return WrongHit(similarity, bar)

    async def _similarity(self, key: RequestKey, policy: FeaturePolicy, entry: Entry) -> float:
        """The reported question's similarity to the entry's, as a lookup measures it."""
        if self.embedder is None:
            return 1.0
        embedded = await self.embedder.embed([key.question(policy.question_mode), entry.question])
        return float(embedded.vectors[0] @ embedded.vectors[1])

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
        model = self._model()
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
            "wrong_hit_reports",
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
