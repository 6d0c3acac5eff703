"""CacheService servicer: proto <-> domain translation around the exact-match store."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.types.v1 import types_pb2
from services.cache.keys import RequestKey
from services.cache.store import Answer, Entry, ExactStore
from services.common.auth import require_role
from services.common.config import Config
from services.common.errors import InvalidArgument
from services.common.server import ServiceDef

SERVICE_NAME = "costmesh.cache.v1.CacheService"
MAX_TTL_SECONDS = 30 * 24 * 3600
_COUNTERS = ("exact_hits", "semantic_hits", "misses", "stores", "evictions", "expirations")


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, store: ExactStore, default_ttl: dict[str, int]) -> None:
        self._store = store
        self._default_ttl = default_ttl

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.LookupResponse:
        require_role("service", "admin")
        if request.max_age_seconds < 0:
            raise InvalidArgument("max_age_seconds", "must not be negative")
        entry = self._store.lookup(_to_key(request.key), request.max_age_seconds)
        trace.get_current_span().set_attributes(
            {"costmesh.feature": request.key.feature, "costmesh.cache.hit": entry is not None}
        )
        if entry is None:
            return cache_pb2.LookupResponse(outcome=types_pb2.CACHE_OUTCOME_MISS)
        return cache_pb2.LookupResponse(
            outcome=types_pb2.CACHE_OUTCOME_EXACT, entry=_to_proto(entry), similarity=1.0
        )

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.StoreResponse:
        require_role("service", "admin")
        key = _to_key(request.key)
        ttl = request.ttl_seconds or self._default_ttl.get(
            key.feature, self._default_ttl["default"]
        )
        if not 0 < ttl <= MAX_TTL_SECONDS:
            raise InvalidArgument("ttl_seconds", f"must be between 1 and {MAX_TTL_SECONDS}")
        if not request.content:
            raise InvalidArgument("content", "an empty answer is never cached")
        answer = Answer(
            content=request.content,
            model=request.model,
            input_tokens=request.usage.input_tokens,
            cached_input_tokens=request.usage.cached_input_tokens,
            output_tokens=request.usage.output_tokens,
            finish_reason=request.finish_reason,
        )
        entry = self._store.store(key, answer, ttl, tuple(request.tags))
        trace.get_current_span().set_attributes(
            {"costmesh.feature": key.feature, "costmesh.cache.ttl_seconds": ttl}
        )
        return cache_pb2.StoreResponse(
            entry_id=entry.entry_id, expires_at=_timestamp(entry.expires_at)
        )

    async def Invalidate(
        self, request: cache_pb2.InvalidateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.InvalidateResponse:
        require_role("service", "admin")
        if not request.feature:
            raise InvalidArgument("feature", "required")
        target = request.WhichOneof("target")
        if target == "tag" and request.tag:
            removed = self._store.invalidate_tag(request.feature, request.tag)
            return cache_pb2.InvalidateResponse(removed_entries=removed)
        if target == "namespace":
            removed, version = self._store.bump_namespace(request.feature, request.namespace)
            return cache_pb2.InvalidateResponse(removed_entries=removed, namespace_version=version)
        raise InvalidArgument("target", "set a non-empty tag or a namespace")

    async def GetStats(
        self, request: cache_pb2.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.GetStatsResponse:
        require_role("service", "admin")
        counts = {
            name: sum(
                n
                for (feature, counter), n in self._store.counters.items()
                if counter == name and (not request.feature or feature == request.feature)
            )
            for name in _COUNTERS
        }
        return cache_pb2.GetStatsResponse(entries=self._store.count(request.feature), **counts)


def _to_key(key: cache_pb2.CacheKey) -> RequestKey:
    if not key.feature:
        raise InvalidArgument("key.feature", "required")
    if not key.messages:
        raise InvalidArgument("key.messages", "at least one message is required")
    params = key.params
    return RequestKey(
        team=key.team,
        feature=key.feature,
        namespace=key.namespace,
        scope_key=key.scope_key,
        model=key.model,
        messages=tuple((m.role, m.content) for m in key.messages),
        params=(
            ("max_tokens", params.max_tokens if params.HasField("max_tokens") else None),
            ("temperature", params.temperature if params.HasField("temperature") else None),
            ("top_p", params.top_p if params.HasField("top_p") else None),
            ("stop", list(params.stop)),
        ),
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
    )


def build(config: Config) -> ServiceDef:
    """The cache service with the in-process store and per-feature TTLs."""
    features = config.section("features")
    ttl = {
        name: features.section(name).get_int("cache_ttl_seconds", 3600, minimum=1)
        for name in features.names()
    }
    ttl.setdefault("default", 3600)
    store = ExactStore(config.section("cache").get_int("max_entries", 100_000, minimum=1))
    servicer = CacheServicer(store, ttl)
    return ServiceDef(
        SERVICE_NAME,
        lambda server: cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server),
    )
