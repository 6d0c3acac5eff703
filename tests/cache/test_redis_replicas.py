"""Cache replicas sharing one real Redis: what one stores the other serves, an
invalidation on one holds on both, a new replica starts warm, and an outage of Redis
costs hits, never a failed call."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from services import SERVICES
from services.cache.redis_store import RedisStore
from services.cache.service import MAX_SOURCE_REQUEST_ID
from services.cache.store import Answer, Capacity, Entry
from services.common.config import load_config
from services.common.embedding import MINILM_DIMENSIONS, normalise
from services.common.server import RunningServer
from services.mesh import start_mesh
from tests.conftest import AUTH, Mesh, bad_request_fields, mesh_env, user_request
from tests.redis_server import PrivateRedis, fresh_prefix

ANSWER = Answer("Tap 'Forgot password'.", "gpt-4o-mini", 10, 0, 5, "stop")
Starter = Callable[[], Awaitable[tuple[RunningServer, "cache_pb2_grpc.CacheServiceAsyncStub"]]]


def redis_config(tmp_path: Path, url: str, prefix: str) -> Path:
    path = tmp_path / "redis-cache.toml"
    path.write_text(f'[cache]\nbackend = "redis"\nredis_url = "{url}"\nredis_prefix = "{prefix}"\n')
    return path


def key(text: str) -> cache_pb2.CacheKey:
    return cache_pb2.CacheKey(
        team="demo",
        feature="support",
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
    )


def store(text: str, tag: str = "", source_request_id: str = "") -> cache_pb2.StoreRequest:
    return cache_pb2.StoreRequest(
        key=key(text),
        content=f"answer to {text}",
        finish_reason="stop",
        tags=[tag] if tag else [],
        source_request_id=source_request_id,
    )


@pytest.fixture
def shared_redis() -> Iterator[tuple[str, str]]:
    """(url, prefix) the replicas share; every key under the prefix is deleted after."""
    with fresh_prefix() as url_and_prefix:
        yield url_and_prefix


@pytest.fixture
async def replicas(tmp_path: Path, shared_redis: tuple[str, str]) -> AsyncIterator[Starter]:
    """Starts cache-only replicas on one Redis prefix; stops them all afterwards."""
    started: list[tuple[RunningServer, grpc.aio.Channel]] = []
    url, prefix = shared_redis
    env = {"COSTMESH_SERVICE_KEY": "replica-test-key"}
    config = load_config(redis_config(tmp_path, url, prefix), env=env)

    async def start() -> tuple[RunningServer, cache_pb2_grpc.CacheServiceAsyncStub]:
        running = await start_mesh(config, env, ["cache"], TracerProvider(), port=0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        started.append((running, channel))
        return running, cache_pb2_grpc.CacheServiceStub(channel)

    try:
        yield start
    finally:
        for running, channel in started:
            await channel.close()
            await running.stop(grace=1)


async def eventually_semantic(
    cache: cache_pb2_grpc.CacheServiceAsyncStub, text: str, within: float
) -> cache_pb2.LookupResponse:
    """Polls Lookup until it is a semantic hit; fails after `within` seconds."""
    async with asyncio.timeout(within):
        while True:
            found = await cache.Lookup(cache_pb2.LookupRequest(key=key(text)), metadata=AUTH)
            if found.outcome == types_pb2.CACHE_OUTCOME_SEMANTIC:
                return found
            await asyncio.sleep(0.01)


async def test_a_store_on_one_replica_is_a_semantic_hit_on_the_other(replicas: Starter) -> None:
    _, first = await replicas()
    _, second = await replicas()

    stored = await first.Store(store("How do I reset my password?"), metadata=AUTH)
    found = await eventually_semantic(second, "how can I reset my password", within=1.0)

    assert found.entry.entry_id == stored.entry_id
    assert found.entry.content == "answer to How do I reset my password?"


async def exact(cache: cache_pb2_grpc.CacheServiceAsyncStub, text: str) -> cache_pb2.LookupResponse:
    found = await cache.Lookup(cache_pb2.LookupRequest(key=key(text)), metadata=AUTH)
    assert found.outcome == types_pb2.CACHE_OUTCOME_EXACT
    return found


async def test_a_hit_on_either_replica_names_the_request_whose_answer_it_is(
    replicas: Starter,
) -> None:
    _, first = await replicas()
    _, second = await replicas()

    await first.Store(
        store("How do I reset my password?", source_request_id="req-1"), metadata=AUTH
    )
    hits = [
        await exact(first, "How do I reset my password?"),
        await exact(second, "How do I reset my password?"),
        await eventually_semantic(first, "how can I reset my password", within=1.0),
        await eventually_semantic(second, "how can I reset my password", within=1.0),
    ]

    assert [hit.entry.source_request_id for hit in hits] == ["req-1"] * 4


# The top-level fields of an entry's "m" JSON before entries carried source_request_id.
FIELDS_BEFORE_SOURCE_REQUEST_ID = {
    "feature", "namespace", "partition", "expires_at", "tags", "nbytes",
    "question", "answer", "created_at",
}  # fmt: skip


async def test_an_entry_stored_before_source_request_ids_is_served_without_one(
    replicas: Starter, shared_redis: tuple[str, str]
) -> None:
    url, prefix = shared_redis
    _, first = await replicas()
    stored = await first.Store(
        store("How do I reset my password?", source_request_id="req-1"), metadata=AUTH
    )
    client = redis.asyncio.Redis.from_url(url)
    try:  # rewrite the entry as the cache wrote it before (its TTL stays)
        entry_key = f"{prefix}:e:{stored.entry_id}"
        raw = await client.hget(entry_key, "m")
        assert isinstance(raw, bytes)
        meta = json.loads(raw)
        assert meta.pop("source_request_id") == "req-1"
        assert set(meta) == FIELDS_BEFORE_SOURCE_REQUEST_ID
        await client.hset(entry_key, "m", json.dumps(meta))
    finally:
        await client.aclose()
    _, second = await replicas()  # mirrors the entry from a scan of Redis

    hits = [
        await exact(first, "How do I reset my password?"),
        await exact(second, "How do I reset my password?"),
        await eventually_semantic(first, "how can I reset my password", within=1.0),
        await eventually_semantic(second, "how can I reset my password", within=1.0),
    ]

    assert [hit.entry.entry_id for hit in hits] == [stored.entry_id] * 4
    assert [hit.entry.source_request_id for hit in hits] == [""] * 4


async def test_a_too_long_source_request_id_is_refused_and_nothing_reaches_redis(
    replicas: Starter, shared_redis: tuple[str, str]
) -> None:
    url, prefix = shared_redis
    _, first = await replicas()
    too_long = store("How do I reset my password?", source_request_id="r" * 1000)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await first.Store(too_long, metadata=AUTH)
    after = await first.Lookup(cache_pb2.LookupRequest(key=too_long.key), metadata=AUTH)
    client = redis.asyncio.Redis.from_url(url)
    try:
        written = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    finally:
        await client.aclose()

    assert len(too_long.source_request_id) > MAX_SOURCE_REQUEST_ID
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["source_request_id"]
    assert after.outcome == types_pb2.CACHE_OUTCOME_MISS
    assert written == []


async def test_an_invalidation_on_one_replica_holds_on_both(replicas: Starter) -> None:
    _, first = await replicas()
    _, second = await replicas()
    await first.Store(store("How do I reset my password?", tag="doc-7"), metadata=AUTH)
    await eventually_semantic(second, "how can I reset my password", within=1.0)

    dropped = await second.Invalidate(
        cache_pb2.InvalidateRequest(feature="support", tag="doc-7"), metadata=AUTH
    )
    on_first = await first.Lookup(
        cache_pb2.LookupRequest(key=key("How do I reset my password?")), metadata=AUTH
    )
    on_second = await second.Lookup(
        cache_pb2.LookupRequest(key=key("how can I reset my password")), metadata=AUTH
    )

    assert dropped.removed_entries == 1
    assert on_first.outcome == on_second.outcome == types_pb2.CACHE_OUTCOME_MISS


async def test_a_namespace_bump_on_one_replica_holds_on_both(replicas: Starter) -> None:
    _, first = await replicas()
    _, second = await replicas()
    await first.Store(store("How do I reset my password?"), metadata=AUTH)
    await eventually_semantic(second, "how can I reset my password", within=1.0)

    bumped = await first.Invalidate(
        cache_pb2.InvalidateRequest(feature="support", namespace=""), metadata=AUTH
    )
    after = await second.Lookup(
        cache_pb2.LookupRequest(key=key("How do I reset my password?")), metadata=AUTH
    )

    assert (bumped.removed_entries, bumped.namespace_version) == (1, 2)
    assert after.outcome == types_pb2.CACHE_OUTCOME_MISS


async def test_a_new_replica_starts_with_the_shared_entries(replicas: Starter) -> None:
    running, first = await replicas()
    await first.Store(store("How do I reset my password?"), metadata=AUTH)
    await running.stop(grace=1)

    _, restarted = await replicas()
    found = await restarted.Lookup(
        cache_pb2.LookupRequest(key=key("how can I reset my password")), metadata=AUTH
    )
    stats = await restarted.GetStats(cache_pb2.GetStatsRequest(), metadata=AUTH)

    assert found.outcome == types_pb2.CACHE_OUTCOME_SEMANTIC
    assert stats.entries == 1


@pytest.fixture
async def mesh_on_private_redis(
    simulator: OpenAISimulator, tmp_path: Path
) -> AsyncIterator[tuple[Mesh, PrivateRedis]]:
    server = PrivateRedis(tmp_path)
    server.start()
    env = mesh_env(simulator, tmp_path)
    config = load_config(redis_config(tmp_path, server.url, "outage-test"), env=env)
    provider = TracerProvider()
    running = await start_mesh(config, env, SERVICES, provider, port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        address = f"127.0.0.1:{running.port}"
        yield Mesh(running, address, channel, InMemorySpanExporter(), tmp_path), server
    finally:
        await channel.close()
        await running.stop(grace=1)
        server.stop()


async def test_redis_stopped_and_restarted_mid_run_fails_no_call(
    mesh_on_private_redis: tuple[Mesh, PrivateRedis], simulator: OpenAISimulator
) -> None:
    mesh, server = mesh_on_private_redis
    ask = mesh.inference.Complete

    await ask(user_request("How do I reset my password?"), metadata=AUTH, timeout=10)
    before = await ask(user_request("how can I reset my password"), metadata=AUTH, timeout=10)
    server.stop()
    during = [
        await ask(user_request(text), metadata=AUTH, timeout=10)
        for text in ("how can I reset my password", "Where is my card?", "Where is my card?")
    ]
    outage = await mesh.cache.GetStats(cache_pb2.GetStatsRequest(), metadata=AUTH)
    server.start()
    async with asyncio.timeout(10):  # stores and lookups resume once Redis answers
        while True:
            await ask(user_request("How do I change my PIN?"), metadata=AUTH, timeout=10)
            again = await ask(user_request("How do I change my PIN?"), metadata=AUTH, timeout=10)
            if again.cached:
                break
            await asyncio.sleep(0.05)
    # ... and semantic hits once the replica's mirror has followed Redis again.
    resumed = await eventually_semantic(mesh.cache, "how can I change my PIN", within=5.0)

    assert before.cache_outcome == types_pb2.CACHE_OUTCOME_SEMANTIC
    assert all(r.cache_outcome == types_pb2.CACHE_OUTCOME_MISS for r in during)
    assert all(r.content for r in during)  # every call answered, from the provider
    assert outage.backend_failures >= 3
    assert resumed.entry.content == again.content


async def test_a_replica_skips_vectors_of_another_embedding_size(tmp_path: Path) -> None:
    with fresh_prefix() as (url, prefix):
        other = RedisStore(url, prefix, 8)  # say, a replica configured with another model
        await other.start()
        vector = normalise(np.ones((1, 8)))[0]
        entry = Entry("a" * 64, "support", "", "p", "q", ANSWER, time.time(), time.time() + 60)
        await other.put(replace(entry, vector=vector), Capacity(10))
        await other.close()

        ours = RedisStore(url, prefix, MINILM_DIMENSIONS)
        await ours.start()
        try:
            async with asyncio.timeout(5):
                await ours.caught_up()
            found = await ours.get("a" * 64)
            mine = replace(entry, entry_id="b" * 64, vector=normalise(np.ones((1, 384)))[0])
            await ours.put(mine, Capacity(10))
            async with asyncio.timeout(5):
                await ours.caught_up()  # the follower survived the foreign vector
            nearest = await ours.nearest("p", normalise(np.ones((1, 384)))[0], 2)
        finally:
            await ours.close()

    assert found is not None  # the entry itself still answers exact lookups
    assert [entry_id for entry_id, _ in nearest] == ["b" * 64]
    assert ours.counters[("support", "foreign_vectors")] == 1


async def test_a_replica_reads_an_entry_written_before_source_request_ids() -> None:
    vector = normalise(np.ones((1, MINILM_DIMENSIONS)))[0]
    now = time.time()
    written_before = {  # an entry's "m" exactly as the cache wrote it before
        "feature": "support",
        "namespace": "",
        "partition": "p",
        "expires_at": now + 60,
        "tags": ["doc-1"],
        "nbytes": 4000,
        "question": "q",
        "answer": {
            "content": ANSWER.content,
            "model": ANSWER.model,
            "input_tokens": 10,
            "cached_input_tokens": 0,
            "output_tokens": 5,
            "finish_reason": "stop",
        },
        "created_at": now,
    }
    with fresh_prefix() as (url, prefix):
        client = redis.asyncio.Redis.from_url(url)
        await client.hset(
            f"{prefix}:e:{'d' * 64}",
            mapping={"m": json.dumps(written_before), "v": vector.tobytes()},
        )
        await client.aclose()
        ours = RedisStore(url, prefix, MINILM_DIMENSIONS)
        await ours.start()  # the mirror is rebuilt from a scan of the entries
        try:
            async with asyncio.timeout(5):
                await ours.caught_up()
            found = await ours.get("d" * 64)
            nearest = await ours.nearest("p", vector, 1)
        finally:
            await ours.close()

    assert found == Entry(
        "d" * 64, "support", "", "p", "q", ANSWER, now, now + 60, ("doc-1",), source_request_id=""
    )
    assert [entry_id for entry_id, _ in nearest] == ["d" * 64]


async def test_a_replica_rebuilds_when_the_events_it_follows_are_gone() -> None:
    with fresh_prefix() as (url, prefix):
        store = RedisStore(url, prefix, MINILM_DIMENSIONS)
        await store.start()
        try:
            vector = normalise(np.ones((1, MINILM_DIMENSIONS)))[0]
            entry = Entry("c" * 64, "support", "", "p", "q", ANSWER, time.time(), time.time() + 60)
            await store.put(replace(entry, vector=vector), Capacity(10))
            async with asyncio.timeout(5):
                await store.caught_up()
            mirrored = store.entries()
            client = redis.asyncio.Redis.from_url(url)
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
            await client.delete(*keys)  # an operator flushes the cache's keys
            await client.aclose()
            async with asyncio.timeout(10):  # noticed within a gap check or two
                while True:
                    if not store.entries():
                        break
                    await asyncio.sleep(0.05)
            nearest = await store.nearest("p", vector, 1)
        finally:
            await store.close()

    assert mirrored == 1
    assert nearest == []
