"""Cache administration over gRPC: stats an operator reads, invalidation they trigger."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from costmesh.cache.v1 import cache_pb2
from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from costmesh_tools.cli import main
from services import SERVICES
from services.cache.service import MAX_SOURCE_REQUEST_ID
from services.common.config import load_config
from services.mesh import start_mesh
from tests.conftest import AUTH, Mesh, bad_request_fields, mesh_env, read_your_writes, user_request


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
    assert (
        await mesh.cache.GetStats(cache_pb2.GetStatsRequest(), metadata=AUTH, timeout=5)
    ).invalidations == 1


async def test_store_refuses_an_empty_answer_and_a_bad_ttl(mesh: Mesh) -> None:
    key = cache_pb2.CacheKey(
        team="demo",  # an admin reaching a team's cache names it
        feature="support",
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="q")],
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


async def test_a_paraphrase_is_served_from_the_cache_with_its_spans(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    first = await mesh.inference.Complete(
        user_request("How do I reset my password?"), metadata=AUTH, timeout=10
    )
    mesh.spans.clear()
    second = await mesh.inference.Complete(
        user_request("how can I reset my password"), metadata=AUTH, timeout=10
    )

    assert second.cache_outcome == types_pb2.CACHE_OUTCOME_SEMANTIC
    assert (second.content, second.cached) == (first.content, True)
    assert simulator.call_count == 1
    finished = mesh.spans.get_finished_spans()
    spans = {s.name: s for s in finished}
    embed, search = spans["cache.embed"], spans["cache.search"]
    assert embed.attributes is not None
    assert embed.attributes["costmesh.embedding.batch_size"] == 1
    assert search.attributes is not None
    assert search.attributes["costmesh.cache.candidates"] == 1
    assert float(search.attributes["costmesh.cache.best_similarity"]) >= 0.92  # type: ignore[arg-type]
    (lookup,) = [
        s for s in finished if s.name.endswith("CacheService/Lookup") and s.kind == SpanKind.SERVER
    ]
    assert lookup.attributes is not None
    assert lookup.attributes["costmesh.cache.outcome"] == "semantic"
    assert embed.parent is not None
    assert search.parent is not None
    assert embed.parent.span_id == search.parent.span_id == lookup.context.span_id


async def test_a_miss_is_embedded_once_for_lookup_and_store(mesh: Mesh) -> None:
    await mesh.inference.Complete(user_request("Where is my card?"), metadata=AUTH, timeout=10)
    # The same request again waits for the store in flight, then hits exactly.
    again = await mesh.inference.Complete(
        user_request("Where is my card?"), metadata=AUTH, timeout=10
    )

    embeds = [s for s in mesh.spans.get_finished_spans() if s.name == "cache.embed"]
    stats = await mesh.cache.GetStats(cache_pb2.GetStatsRequest(), metadata=AUTH, timeout=5)
    assert again.cache_outcome == types_pb2.CACHE_OUTCOME_EXACT
    assert len(embeds) == 1
    assert stats.stores == 1


@pytest.mark.parametrize(
    "change",
    [
        {"scope_key": "tenant-b"},
        {"model": "gpt-4o"},
        {"system": "Answer in French."},
        {"namespace": "v2"},
    ],
    ids=lambda c: next(iter(c)),
)
async def test_complete_never_serves_an_answer_across_a_scope(
    mesh: Mesh, simulator: OpenAISimulator, change: dict[str, str]
) -> None:
    def request(text: str, **c: str) -> inference_pb2.CompleteRequest:
        messages = [
            types_pb2.ChatMessage(role=types_pb2.ROLE_SYSTEM, content=c.get("system", "Be brief."))
        ]
        messages.append(types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text))
        return inference_pb2.CompleteRequest(
            feature="support",
            messages=messages,
            scope_key=c.get("scope_key", "tenant-a"),
            model=c.get("model", ""),
            cache_control=inference_pb2.CacheControl(namespace=c.get("namespace", "")),
        )

    await mesh.inference.Complete(request("How do I reset my password?"), metadata=AUTH, timeout=10)
    again = await mesh.inference.Complete(
        request("how can I reset my password"), metadata=AUTH, timeout=10
    )
    crossed = await mesh.inference.Complete(
        request("How do I reset my password?", **change), metadata=AUTH, timeout=10
    )

    assert again.cache_outcome == types_pb2.CACHE_OUTCOME_SEMANTIC
    assert crossed.cache_outcome == types_pb2.CACHE_OUTCOME_MISS
    assert simulator.call_count == 2


async def test_concurrent_identical_misses_make_one_provider_call(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.set_latency(1.0)

    answers = await asyncio.gather(
        *(
            mesh.inference.Complete(
                user_request("Why was I charged twice?"), metadata=AUTH, timeout=10
            )
            for _ in range(5)
        )
    )

    assert simulator.call_count == 1
    assert len({a.content for a in answers}) == 1
    assert sorted(a.cached for a in answers) == [False, True, True, True, True]
    spend = await mesh.ledger.QuerySpend(
        ledger_pb2.QuerySpendRequest(group_by=ledger_pb2.GROUP_BY_FEATURE), metadata=AUTH, timeout=5
    )
    assert [(r.calls, r.cached_calls) for r in spend.rows] == [(5, 4)]


async def test_tags_from_the_request_let_an_operator_invalidate_the_answer(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    tagged = user_request(
        "What is the fee for international transfers?",
        cache_control=inference_pb2.CacheControl(tags=["pricing-page"]),
    )
    await mesh.inference.Complete(tagged, metadata=AUTH, timeout=10)
    await mesh.inference.Complete(tagged, metadata=AUTH, timeout=10)  # waits for the store

    dropped = await mesh.cache.Invalidate(
        cache_pb2.InvalidateRequest(feature="support", tag="pricing-page"), metadata=AUTH, timeout=5
    )
    again = await mesh.inference.Complete(tagged, metadata=AUTH, timeout=10)

    assert dropped.removed_entries == 1
    assert again.cache_outcome == types_pb2.CACHE_OUTCOME_MISS
    assert simulator.call_count == 2
    assert (
        await mesh.cache.GetStats(cache_pb2.GetStatsRequest(), metadata=AUTH, timeout=5)
    ).invalidations == 1


async def test_store_refuses_an_unfinished_answer(mesh: Mesh) -> None:
    key = cache_pb2.CacheKey(
        team="demo",  # an admin reaching a team's cache names it
        feature="support",
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="q")],
    )
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await mesh.cache.Store(
            cache_pb2.StoreRequest(key=key, content="half an ans", finish_reason="content_filter"),
            metadata=AUTH,
            timeout=5,
        )

    assert cut.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (cut.value.details() or "").startswith("finish_reason")
    stats = await mesh.cache.GetStats(cache_pb2.GetStatsRequest(), metadata=AUTH, timeout=5)
    assert stats.entries == 0


@pytest.fixture
async def openai_embeddings_mesh(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[Mesh]:
    """The mesh with the cache embedding through the provider's embeddings endpoint."""
    config = tmp_path / "openai-embeddings.toml"
    config.write_text(
        '[cache]\nembedding_provider = "openai"\n'
        'embedding_model = "text-embedding-3-small"\nembedding_dimensions = 64\n'
        # A model without calibration: the threshold is set by hand.
        "[features.default]\ncache_similarity_threshold = 0.9\n"
    )
    env = mesh_env(simulator, tmp_path)
    running = await start_mesh(load_config(config, env=env), env, SERVICES, TracerProvider(), 0)
    address = f"127.0.0.1:{running.port}"
    try:
        interceptors = read_your_writes(running)
        async with grpc.aio.insecure_channel(address, interceptors=interceptors) as channel:
            yield Mesh(running, address, channel, InMemorySpanExporter(), tmp_path)
    finally:
        await running.stop(grace=1)


async def test_a_billed_embedding_is_recorded_in_the_ledger_as_cache_overhead(
    openai_embeddings_mesh: Mesh,
) -> None:
    mesh = openai_embeddings_mesh
    reply = await mesh.inference.Complete(
        user_request("How do I reset my password?"), metadata=AUTH, timeout=10
    )
    spend = await mesh.ledger.QuerySpend(
        ledger_pb2.QuerySpendRequest(group_by=ledger_pb2.GROUP_BY_MODEL), metadata=AUTH, timeout=5
    )

    rows = {row.key: row for row in spend.rows}
    embedding = rows["text-embedding-3-small"]
    assert (embedding.calls, embedding.output_tokens) == (0, 0)  # overhead, not an answer
    assert embedding.input_tokens > 0
    assert embedding.cost_nano_usd == embedding.input_tokens * 20  # $0.02 per million
    assert embedding.counterfactual_cost_nano_usd == 0  # no cache, no embedding
    assert reply.cost_nano_usd == spend.total_cost_nano_usd


async def test_a_failing_embeddings_provider_costs_a_miss_not_the_call(
    openai_embeddings_mesh: Mesh, simulator: OpenAISimulator
) -> None:
    mesh = openai_embeddings_mesh
    simulator.fail_next(1, status=503)  # the lookup's embedding call

    reply = await mesh.inference.Complete(
        user_request("How do I reset my password?"), metadata=AUTH, timeout=10
    )
    stats = await mesh.cache.GetStats(cache_pb2.GetStatsRequest(), metadata=AUTH, timeout=5)

    assert reply.content
    assert reply.cache_outcome == types_pb2.CACHE_OUTCOME_MISS
    assert (stats.backend_failures, stats.misses) == (1, 1)


async def test_a_per_tenant_feature_refuses_a_call_without_a_tenant(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    config = tmp_path / "per-tenant.toml"
    config.write_text("[features.support]\ncache_per_tenant = true\n")
    env = mesh_env(simulator, tmp_path)
    running = await start_mesh(load_config(config, env=env), env, SERVICES, TracerProvider(), 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            inference = inference_pb2_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await inference.Complete(user_request("Where is my card?"), metadata=AUTH)
            scoped = await inference.Complete(
                user_request("Where is my card?", scope_key="tenant-1"), metadata=AUTH
            )
    finally:
        await running.stop(grace=1)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "per tenant" in (refused.value.details() or "")
    assert scoped.content
    assert simulator.call_count == 1  # the refused call never reached the provider


def answer_for(text: str, source_request_id: str = "") -> cache_pb2.StoreRequest:
    return cache_pb2.StoreRequest(
        key=cache_pb2.CacheKey(
            team="demo",
            feature="support",
            messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
        ),
        content=f"answer to {text}",
        finish_reason="stop",
        source_request_id=source_request_id,
    )


async def test_a_hit_hands_back_the_request_id_whose_answer_it_reuses(mesh: Mesh) -> None:
    stored = await mesh.cache.Store(
        answer_for("How do I reset my password?", "req-1"), metadata=AUTH, timeout=5
    )
    await mesh.cache.Store(answer_for("What are your opening hours?"), metadata=AUTH, timeout=5)

    async def lookup(text: str) -> cache_pb2.LookupResponse:
        request = cache_pb2.LookupRequest(key=answer_for(text).key)
        return await mesh.cache.Lookup(request, metadata=AUTH, timeout=5)

    exact = await lookup("How do I reset my password?")
    semantic = await lookup("how can I reset my password")
    unnamed = await lookup("What are your opening hours?")

    assert (exact.outcome, semantic.outcome, unnamed.outcome) == (
        types_pb2.CACHE_OUTCOME_EXACT,
        types_pb2.CACHE_OUTCOME_SEMANTIC,
        types_pb2.CACHE_OUTCOME_EXACT,
    )
    assert exact.entry.entry_id == semantic.entry.entry_id == stored.entry_id
    assert exact.entry.source_request_id == semantic.entry.source_request_id == "req-1"
    assert unnamed.entry.source_request_id == ""


async def test_store_refuses_a_source_request_id_longer_than_a_request_id(mesh: Mesh) -> None:
    too_long = answer_for("Where is my card?", "r" * (MAX_SOURCE_REQUEST_ID + 1))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.cache.Store(too_long, metadata=AUTH, timeout=5)
    longest = answer_for("What are your opening hours?", "r" * MAX_SOURCE_REQUEST_ID)
    await mesh.cache.Store(longest, metadata=AUTH, timeout=5)

    after = await mesh.cache.Lookup(
        cache_pb2.LookupRequest(key=too_long.key), metadata=AUTH, timeout=5
    )
    stats = await mesh.cache.GetStats(cache_pb2.GetStatsRequest(), metadata=AUTH, timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("source_request_id")
    assert bad_request_fields(refused.value) == ["source_request_id"]
    assert after.outcome == types_pb2.CACHE_OUTCOME_MISS
    assert (stats.stores, stats.entries) == (1, 1)  # only the one at the bound


async def test_a_wrong_hit_reported_to_inference_is_dropped_and_not_served_again(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    await mesh.inference.Complete(
        user_request("How do I close my account?"), metadata=AUTH, timeout=10
    )
    # A low threshold for this request, so that the model serves a look-alike.
    asked = user_request("How can I delete my profile picture?")
    asked.cache_control.similarity_threshold = 0.3
    wrong = await mesh.inference.Complete(asked, metadata=AUTH, timeout=10)
    assert wrong.cache_outcome == types_pb2.CACHE_OUTCOME_SEMANTIC
    assert wrong.cache_entry_id
    mesh.spans.clear()

    report = await mesh.inference.ReportWrongHit(
        inference_pb2.ReportWrongHitRequest(request=asked, cache_entry_id=wrong.cache_entry_id),
        metadata=AUTH,
        timeout=10,
    )
    again = await mesh.inference.Complete(asked, metadata=AUTH, timeout=10)
    stats = await mesh.cache.GetStats(cache_pb2.GetStatsRequest(), metadata=AUTH, timeout=5)

    assert 0.3 <= report.similarity < report.partition_threshold
    assert again.cache_outcome == types_pb2.CACHE_OUTCOME_MISS
    assert simulator.call_count == 2
    assert stats.wrong_hit_reports == 1
    spans = mesh.spans.get_finished_spans()
    (cache_span,) = [
        s
        for s in spans
        if s.name.endswith("CacheService/ReportWrongHit") and s.kind == SpanKind.SERVER
    ]
    (front,) = [
        s
        for s in spans
        if s.name.endswith("InferenceService/ReportWrongHit") and s.kind == SpanKind.SERVER
    ]
    assert cache_span.context.trace_id == front.context.trace_id
    assert cache_span.attributes is not None
    assert cache_span.attributes["costmesh.cache.entry_id"] == wrong.cache_entry_id
    assert cache_span.attributes["costmesh.cache.partition_threshold"] == pytest.approx(
        report.partition_threshold
    )
    (lookup,) = [
        s for s in spans if s.name.endswith("CacheService/Lookup") and s.kind == SpanKind.SERVER
    ]
    assert lookup.attributes is not None
    assert lookup.attributes["costmesh.cache.outcome"] == "miss"  # the entry is gone


async def test_a_report_of_an_entry_that_is_gone_or_unnamed_gets_a_clear_status(
    mesh: Mesh,
) -> None:
    first = await mesh.inference.Complete(user_request("Opening hours?"), metadata=AUTH, timeout=10)
    hit = await mesh.inference.Complete(user_request("Opening hours?"), metadata=AUTH, timeout=10)
    report = inference_pb2.ReportWrongHitRequest(
        request=user_request("Opening hours?"), cache_entry_id=hit.cache_entry_id
    )

    exact = await mesh.inference.ReportWrongHit(report, metadata=AUTH, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await mesh.inference.ReportWrongHit(report, metadata=AUTH, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as unnamed:
        await mesh.inference.ReportWrongHit(
            inference_pb2.ReportWrongHitRequest(request=user_request("Opening hours?")),
            metadata=AUTH,
            timeout=10,
        )
    after = await mesh.inference.Complete(user_request("Opening hours?"), metadata=AUTH, timeout=10)

    assert not first.cached
    assert hit.cache_outcome == types_pb2.CACHE_OUTCOME_EXACT
    assert exact.similarity == 1.0  # the answer was wrong, not the match: no bar to raise
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert "gone" in (gone.value.details() or "")
    assert unnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(unnamed.value) == ["cache_entry_id"]
    assert after.cache_outcome == types_pb2.CACHE_OUTCOME_MISS


async def test_the_cli_reports_a_wrong_hit(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    await mesh.inference.Complete(
        user_request("How do I close my account?"), metadata=AUTH, timeout=10
    )
    asked = user_request("How can I delete my profile picture?")
    asked.cache_control.similarity_threshold = 0.3
    wrong = await mesh.inference.Complete(asked, metadata=AUTH, timeout=10)
    argv = [
        "cache", "report-wrong-hit", "--addr", mesh.address, "--key", AUTH[0][1].split()[1],
        "--feature", "support", "--question", "How can I delete my profile picture?",
        "--entry", wrong.cache_entry_id,
    ]  # fmt: skip

    code = await asyncio.to_thread(main, argv)
    again = await asyncio.to_thread(main, argv)

    assert (code, again) == (0, 1)
    captured = capsys.readouterr()
    assert f"dropped entry {wrong.cache_entry_id}" in captured.out
    assert "NOT_FOUND" in captured.err
