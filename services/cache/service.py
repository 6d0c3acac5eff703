"""CacheService servicer: proto <-> domain translation around the semantic cache."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.types.v1 import types_pb2
from services.cache.keys import RequestKey
from services.cache.redis_store import RedisStore
from services.cache.semantic import LookupResult, SemanticCache
from services.cache.settings import CacheSettings
from services.cache.store import Answer, Entry, MemoryStore, Store, StoreUnavailableError
from services.common import access
from services.common.auth import current_principal
from services.common.config import Config
from services.common.embedding import EmbeddingUnavailableError
from services.common.errors import InvalidArgument, Unavailable
from services.common.limits import MAX_REQUEST_ID
from services.common.server import ServiceDef

SERVICE_NAME = "costmesh.cache.v1.CacheService"
MAX_TTL_SECONDS = 30 * 24 * 3600
# A source_request_id names the request id of a ledger row: bounded the same way.
MAX_SOURCE_REQUEST_ID = MAX_REQUEST_ID
# Only answers the provider finished are worth serving again.
CACHEABLE_FINISH_REASONS = ("stop", "length")
_OUTCOMES = {
    "exact": types_pb2.CACHE_OUTCOME_EXACT,
    "semantic": types_pb2.CACHE_OUTCOME_SEMANTIC,
    "miss": types_pb2.CACHE_OUTCOME_MISS,
}
log = logging.getLogger(__name__)


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, cache: SemanticCache) -> None:
        self._cache = cache

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.LookupResponse:
        _audit_admin("Lookup", request.key.team)
        if request.max_age_seconds < 0:
            raise InvalidArgument("max_age_seconds", "must not be negative")
        threshold = None
        if request.HasField("similarity_threshold"):
            threshold = request.similarity_threshold
            if not 0 <= threshold <= 1:
                raise InvalidArgument("similarity_threshold", "must be between 0 and 1")
        key = _to_key(request.key)
        result = await self._cache.lookup(key, request.max_age_seconds, threshold)
        _trace_decision(key, result, threshold)
        response = cache_pb2.LookupResponse(
            outcome=_OUTCOMES[result.outcome],
            similarity=result.similarity,
            best_similarity=result.best_similarity,
            guard_rejection=result.guard_rejection,
            embedding_usage=types_pb2.TokenUsage(input_tokens=result.embedding_tokens),
            namespace_version=result.version,
            looked_up_at=_timestamp(result.looked_up_at),
            threshold=result.threshold,
        )
        if result.entry is not None:
            response.entry.CopyFrom(_to_proto(result.entry))
        if result.vector is not None and self._cache.embedder is not None:
            response.query_embedding.extend(result.vector.tolist())
            response.embedding_model = self._cache.embedder.model
        return response

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.StoreResponse:
        _audit_admin("Store", request.key.team)
        key = _to_key(request.key)
        ttl = request.ttl_seconds or self._cache.policy(key).ttl_seconds
        if not 0 < ttl <= MAX_TTL_SECONDS:
            raise InvalidArgument("ttl_seconds", f"must be between 1 and {MAX_TTL_SECONDS}")
        if not request.content:
            raise InvalidArgument("content", "an empty answer is never cached")
        if request.finish_reason not in CACHEABLE_FINISH_REASONS:
            raise InvalidArgument(
                "finish_reason",
                f"only finished answers ({', '.join(CACHEABLE_FINISH_REASONS)}) are cached, "
                f"not {request.finish_reason or 'an unfinished one'!r}",
            )
        answer = Answer(
            content=request.content,
            model=request.model,
            input_tokens=request.usage.input_tokens,
            cached_input_tokens=request.usage.cached_input_tokens,
            output_tokens=request.usage.output_tokens,
            finish_reason=request.finish_reason,
        )
        if request.namespace_version < 0:
            raise InvalidArgument("namespace_version", "must not be negative")
        if len(request.source_request_id) > MAX_SOURCE_REQUEST_ID:
            raise InvalidArgument(
                "source_request_id", f"at most {MAX_SOURCE_REQUEST_ID} characters"
            )
        entry = await self._cache.put(
            key,
            answer,
            ttl,
            tuple(request.tags),
            vector=self._supplied_vector(request),
            seen_version=request.namespace_version,
            looked_up_at=(
                request.looked_up_at.ToNanoseconds() / 1e9
                if request.HasField("looked_up_at")
                else 0.0
            ),
            source_request_id=request.source_request_id,
        )
        trace.get_current_span().set_attributes(
            {
                "costmesh.feature": key.feature,
                "costmesh.cache.ttl_seconds": ttl,
                "costmesh.cache.stored": entry is not None,
            }
        )
        if entry is None:  # the backend is down: dropped, not failed (fail-open)
            return cache_pb2.StoreResponse()
        return cache_pb2.StoreResponse(
            entry_id=entry.entry_id, expires_at=_timestamp(entry.expires_at)
        )

    def _supplied_vector(self, request: cache_pb2.StoreRequest) -> np.ndarray[Any, Any] | None:
        """The lookup's embedding, passed back so a miss is embedded only once."""
        embedder = self._cache.embedder
        if not request.query_embedding or embedder is None:
            return None
        if request.embedding_model != embedder.model:
            return None
        if len(request.query_embedding) != embedder.dimensions:
            raise InvalidArgument(
                "query_embedding", f"{embedder.model} vectors have {embedder.dimensions} values"
            )
        vector = np.asarray(request.query_embedding, dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        if not 0.99 < norm < 1.01:
            raise InvalidArgument("query_embedding", "must be the unit vector Lookup returned")
        return vector

    async def Invalidate(
        self, request: cache_pb2.InvalidateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.InvalidateResponse:
        _audit_admin("Invalidate", None)
        if not request.feature:
            raise InvalidArgument("feature", "required")
        target = request.WhichOneof("target")
        store = self._cache.store
        try:
            if target == "tag" and request.tag:
                removed = await store.invalidate_tag(request.feature, request.tag)
                return cache_pb2.InvalidateResponse(removed_entries=removed)
            if target == "namespace":
                removed, version = await store.bump(request.feature, request.namespace)
                return cache_pb2.InvalidateResponse(
                    removed_entries=removed, namespace_version=version
                )
        except StoreUnavailableError as exc:
            # Unlike a lookup, an invalidation must not pass silently: say it failed.
            raise Unavailable(f"cache backend unavailable: {exc}") from exc
        raise InvalidArgument("target", "set a non-empty tag or a namespace")

    async def ReportWrongHit(
        self,
        request: cache_pb2.ReportWrongHitRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> cache_pb2.ReportWrongHitResponse:
        _audit_admin("ReportWrongHit", request.key.team)
        if not request.entry_id:
            raise InvalidArgument("entry_id", "required: the entry_id of the hit")
        key = _to_key(request.key)
        try:
            wrong = await self._cache.report_wrong_hit(key, request.entry_id)
        except StoreUnavailableError as exc:
            raise Unavailable(f"cache backend unavailable: {exc}") from exc
        except EmbeddingUnavailableError as exc:
            raise Unavailable(f"embeddings unavailable: {exc}") from exc
        trace.get_current_span().set_attributes(
            {
                "costmesh.feature": key.feature,
                "costmesh.cache.entry_id": request.entry_id,
                "costmesh.cache.similarity": wrong.similarity,
                "costmesh.cache.partition_threshold": wrong.partition_threshold,
            }
        )
        log.info(
            "wrong hit reported: feature %s entry %s at similarity %.4f; partition bar now %.4f",
            key.feature,
            request.entry_id,
            wrong.similarity,
            wrong.partition_threshold,
        )
        return cache_pb2.ReportWrongHitResponse(
            similarity=wrong.similarity, partition_threshold=wrong.partition_threshold
        )

    async def GetStats(
        self, request: cache_pb2.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.GetStatsResponse:
        _audit_admin("GetStats", None)
        stats = self._cache.stats(request.feature)
        return cache_pb2.GetStatsResponse(
            entries=int(stats["entries"]),
            exact_hits=int(stats["exact_hits"]),
            semantic_hits=int(stats["semantic_hits"]),
            misses=int(stats["misses"]),
            stores=int(stats["stores"]),
            evictions=int(stats["evictions"]),
            expirations=int(stats["expirations"]),
            hit_rate=float(stats["hit_rate"]),
            memory_bytes=int(stats["memory_bytes"]),
            guard_rejections=int(stats["guard_rejections"]),
            backend_failures=int(stats["backend_failures"]),
            invalidations=int(stats["invalidations"]),
            stale_stores=int(stats["stale_stores"]),
            wrong_hit_reports=int(stats["wrong_hit_reports"]),
        )


def _audit_admin(rpc: str, team: str | None) -> None:
    """Admins reach a team's cache for diagnostics only: a keyed call names the team
    (`team` is None for feature-wide calls), and every admin call is logged and on the
    span. Who may call at all is the access table's (services/common/access.py)."""
    principal = current_principal()
    if principal.role != "admin":
        return
    if team == "":
        raise InvalidArgument("key.team", "an admin names the team whose cache it reaches")
    whose = f"team {team}'s cache" if team else "every team's cache of the feature"
    access.audit.info("cache %s by an admin of team %s: %s", rpc, principal.team, whose)
    trace.get_current_span().set_attributes(
        {"costmesh.audit.admin_team": principal.team, "costmesh.audit.cache_team": team or "*"}
    )


def _trace_decision(key: RequestKey, result: LookupResult, threshold: float | None) -> None:
    span = trace.get_current_span()
    span.set_attributes(
        {
            "costmesh.feature": key.feature,
            "costmesh.cache.hit": result.entry is not None,
            "costmesh.cache.outcome": result.outcome,
            "costmesh.cache.similarity": result.similarity,
            "costmesh.cache.best_similarity": result.best_similarity,
        }
    )
    if threshold is not None:
        span.set_attribute("costmesh.cache.threshold_override", threshold)
    if result.threshold:
        span.set_attribute("costmesh.cache.threshold", result.threshold)
    if result.entry is not None:
        span.set_attribute("costmesh.cache.entry_id", result.entry.entry_id)
    if result.guard_rejection:
        span.set_attribute("costmesh.cache.guard_rejection", result.guard_rejection)


def _to_key(key: cache_pb2.CacheKey) -> RequestKey:
    if not key.feature:
        raise InvalidArgument("key.feature", "required")
    if not key.messages:
        raise InvalidArgument("key.messages", "at least one message is required")
    return RequestKey(
        team=key.team,
        feature=key.feature,
        namespace=key.namespace,
        scope_key=key.scope_key,
        model=key.model,
        messages=tuple((m.role, m.content) for m in key.messages),
        params=key.params.SerializeToString(deterministic=True),
    )


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _to_proto(entry: Entry) -> cache_pb2.CacheEntry:
    answer = entry.answer
    return cache_pb2.CacheEntry(
        entry_id=entry.entry_id,
        content=answer.content,
        model=answer.model,
        usage=types_pb2.TokenUsage(
            input_tokens=answer.input_tokens,
            cached_input_tokens=answer.cached_input_tokens,
            output_tokens=answer.output_tokens,
        ),
        created_at=_timestamp(entry.created_at),
        expires_at=_timestamp(entry.expires_at),
        tags=list(entry.tags),
        finish_reason=answer.finish_reason,
        question=entry.question,
        source_request_id=entry.source_request_id,
    )


def open_store(settings: CacheSettings, dimensions: int) -> Store:
    if settings.backend == "redis":
        return RedisStore(
            settings.redis_url,
            settings.redis_prefix,
            dimensions,
            ann_threshold=settings.ann_threshold,
        )
    return MemoryStore(dimensions, settings.ann_threshold)


def build(
    config: Config, env: Mapping[str, str], tracer_provider: trace.TracerProvider
) -> ServiceDef:
    """The cache service on the configured backend and embedder."""
    settings = CacheSettings.from_config(config)
    tracer = tracer_provider.get_tracer("costmesh.cache")
    timeout = config.section("peers").get_float("timeout_seconds", 5.0)
    embedder = settings.embedder(timeout, tracer, env)
    store = open_store(settings, embedder.dimensions if embedder else 0)
    cache = SemanticCache(store, embedder, settings.policies, tracer=tracer)
    servicer = CacheServicer(cache)

    async def start() -> None:
        await store.start()

    async def stop() -> None:
        await store.close()
        if embedder is not None:
            await embedder.close()

    return ServiceDef(
        SERVICE_NAME,
        lambda server: cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server),
        start=start,
        stop=stop,
    )
