"""Cache administration over gRPC: stats an operator reads, invalidation they trigger."""

from __future__ import annotations

import grpc
import pytest

from costmesh.cache.v1 import cache_pb2
from costmesh.types.v1 import types_pb2
from services.inference.simulator import OpenAISimulator
from tests.conftest import AUTH, Mesh, user_request


async def test_stats_count_misses_hits_and_stores(mesh: Mesh) -> None:
    for _ in range(3):
        await mesh.inference.Complete(user_request("Opening hours?"), metadata=AUTH, timeout=10)

    stats = await mesh.cache.GetStats(
        cache_pb2.GetStatsRequest(feature="support"), metadata=AUTH, timeout=5
    )
    other = await mesh.cache.GetStats(
        cache_pb2.GetStatsRequest(feature="default"), metadata=AUTH, timeout=5
    )

    assert (stats.misses, stats.exact_hits, stats.stores, stats.entries) == (1, 2, 1, 1)
    assert (other.misses, other.entries) == (0, 0)


async def test_namespace_bump_makes_the_next_identical_request_miss(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    await mesh.inference.Complete(user_request("Return policy?"), metadata=AUTH, timeout=10)
    bumped = await mesh.cache.Invalidate(
        cache_pb2.InvalidateRequest(feature="support", namespace=""), metadata=AUTH, timeout=5
    )
    after = await mesh.inference.Complete(user_request("Return policy?"), metadata=AUTH, timeout=10)

    assert (bumped.removed_entries, bumped.namespace_version) == (1, 2)
    assert after.cache_outcome == types_pb2.CACHE_OUTCOME_MISS
    assert simulator.call_count == 2


async def test_store_refuses_an_empty_answer_and_a_bad_ttl(mesh: Mesh) -> None:
    key = cache_pb2.CacheKey(
        feature="support", messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="q")]
    )
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await mesh.cache.Store(cache_pb2.StoreRequest(key=key), metadata=AUTH, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as ttl:
        await mesh.cache.Store(
            cache_pb2.StoreRequest(key=key, content="a", ttl_seconds=-1), metadata=AUTH, timeout=5
        )

    assert empty.value.code() == ttl.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (empty.value.details() or "").startswith("content")
    assert (ttl.value.details() or "").startswith("ttl_seconds")
