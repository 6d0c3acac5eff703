"""The contract between services holds the same whether a peer is reached over gRPC
or in process: the same answers, the same error statuses, copies of the messages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.trace import SpanKind

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from services.common import auth
from tests.cache.test_service import answer_for
from tests.conftest import AUTH, Mesh, bad_request_fields, user_request

MEMBER = (("authorization", "Bearer not-a-configured-key"),)


@pytest.fixture(params=["grpc", "in-process"])
async def channel(request: pytest.FixtureRequest, mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    """The mesh's services over loopback gRPC, or called directly in its process."""
    if request.param == "grpc":
        yield mesh.channel
    else:
        assert mesh.running.local is not None, "one-process mesh calls its peers in process"
        yield mesh.running.local.channel()


async def test_a_stored_answer_comes_back_the_same_either_way(channel: grpc.aio.Channel) -> None:
    cache = cache_pb2_grpc.CacheServiceStub(channel)
    stored = await cache.Store(answer_for("How do I close my account?"), metadata=AUTH, timeout=5)
    lookup = cache_pb2.LookupRequest(key=answer_for("How do I close my account?").key)

    found = await cache.Lookup(lookup, metadata=AUTH, timeout=5)

    assert found.outcome == types_pb2.CACHE_OUTCOME_EXACT
    assert found.entry.entry_id == stored.entry_id
    assert found.entry.content == "answer to How do I close my account?"


async def test_each_side_holds_its_own_copy(channel: grpc.aio.Channel) -> None:
    cache = cache_pb2_grpc.CacheServiceStub(channel)
    store = answer_for("Where can I see my invoices?")
    await cache.Store(store, metadata=AUTH, timeout=5)
    store.content = "changed by the caller after the call"
    lookup = cache_pb2.LookupRequest(key=answer_for("Where can I see my invoices?").key)

    first = await cache.Lookup(lookup, metadata=AUTH, timeout=5)
    first.entry.content = "changed by the caller after the reply"
    again = await cache.Lookup(lookup, metadata=AUTH, timeout=5)

    assert again.entry.content == "answer to Where can I see my invoices?"


async def test_bad_input_gets_the_same_status_and_details(channel: grpc.aio.Channel) -> None:
    cache = cache_pb2_grpc.CacheServiceStub(channel)
    bad = cache_pb2.LookupRequest(key=answer_for("q").key, max_age_seconds=-1)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cache.Lookup(bad, metadata=AUTH, timeout=5)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("max_age_seconds")
    assert bad_request_fields(refused.value) == ["max_age_seconds"]


async def test_an_unknown_key_is_refused_either_way(channel: grpc.aio.Channel) -> None:
    router = router_pb2_grpc.RouterServiceStub(channel)
    request = router_pb2.RouteRequest(
        feature="support",
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="hello")],
    )

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await router.Route(request, metadata=MEMBER, timeout=5)

    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_deadline_already_gone_is_deadline_exceeded(channel: grpc.aio.Channel) -> None:
    inference = inference_pb2_grpc.InferenceServiceStub(channel)

    with pytest.raises(grpc.aio.AioRpcError) as late:
        await inference.Complete(user_request("Any news on my refund?"), metadata=AUTH, timeout=0)

    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_server_stream_streams_either_way(channel: grpc.aio.Channel, mesh: Mesh) -> None:
    reply = await mesh.inference.Complete(
        user_request("How long does a refund take?"), metadata=AUTH, timeout=10
    )
    await mesh.running.settled()
    ledger = ledger_pb2_grpc.LedgerServiceStub(channel)

    rows = [
        item.record
        async for item in ledger.ExportUsage(
            ledger_pb2.ExportUsageRequest(), metadata=AUTH, timeout=5
        )
    ]

    assert [r.request_id for r in rows] == [reply.request_id]


async def test_an_in_process_call_is_the_callees_server_span(mesh: Mesh) -> None:
    assert mesh.running.local is not None
    cache = cache_pb2_grpc.CacheServiceStub(mesh.running.local.channel())
    mesh.spans.clear()

    with pytest.raises(grpc.aio.AioRpcError):
        await cache.Lookup(
            cache_pb2.LookupRequest(key=answer_for("q").key, max_age_seconds=-1),
            metadata=AUTH,
            timeout=5,
        )

    (span,) = [s for s in mesh.spans.get_finished_spans() if s.name.endswith("/Lookup")]
    assert span.name == "/costmesh.cache.v1.CacheService/Lookup"
    assert span.kind == SpanKind.SERVER
    assert span.attributes is not None
    assert span.attributes["rpc.service"] == "costmesh.cache.v1.CacheService"
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not span.status.is_ok


async def test_an_in_process_stream_leaves_the_callers_principal_alone(mesh: Mesh) -> None:
    for question in ("Where is my refund?", "How do I close my account?"):
        await mesh.inference.Complete(user_request(question), metadata=AUTH, timeout=10)
    await mesh.running.settled()
    assert mesh.running.local is not None
    ledger = ledger_pb2_grpc.LedgerServiceStub(mesh.running.local.channel())
    caller = auth.Principal("demo", "member")
    token = auth.set_current(caller)
    try:
        seen = []
        stream = ledger.ExportUsage(ledger_pb2.ExportUsageRequest(), metadata=AUTH, timeout=5)
        async for _ in stream:
            seen.append(auth.current_principal())  # between messages: still the caller
            break
        after = auth.current_principal()
    finally:
        auth.reset_current(token)

    assert seen == [caller]
    assert after == caller


async def test_a_stream_whose_caller_is_cancelled_still_ends_its_span(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    assert mesh.running.local is not None
    inference = inference_pb2_grpc.InferenceServiceStub(mesh.running.local.channel())
    simulator.set_latency(2.0)
    mesh.spans.clear()

    async def read() -> None:
        request = inference_pb2.StreamCompleteRequest(request=user_request("Slow, please"))
        async for _ in inference.StreamComplete(request, metadata=AUTH, timeout=10):
            pass

    reader = asyncio.ensure_future(read())
    assert await asyncio.to_thread(simulator.wait_for_arrivals, 1, 5.0)
    # The caller gives up while it waits for the first piece, and (as anyio's cancel
    # scopes do, under Starlette) cancels again while the stream is closing.
    while not reader.done():
        reader.cancel()
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await reader

    ended = [s for s in mesh.spans.get_finished_spans() if s.name.endswith("/StreamComplete")]
    assert len(ended) == 1
    assert ended[0].attributes is not None
    assert ended[0].attributes["costmesh.transport"] == "in-process"
