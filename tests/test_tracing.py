"""One trace id from the client's call to the provider call and the ledger write."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from services.common import telemetry
from tests.conftest import AUTH, PROVIDER_KEY, Mesh, user_request
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.processes import start_service

SERVICE_KEY = "cm-test-service-key"


def _client(address: str) -> tuple[grpc.aio.Channel, InMemorySpanExporter, TracerProvider]:
    """A traced client, as an instrumented application would call the mesh."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    channel = grpc.aio.insecure_channel(
        address, interceptors=telemetry.client_interceptors(provider)
    )
    return channel, exporter, provider


def _named(spans: Sequence[ReadableSpan], fragment: str, kind: SpanKind) -> ReadableSpan:
    matches = [s for s in spans if fragment in s.name and s.kind == kind]
    assert len(matches) == 1, (
        f"expected one {kind.name} span named *{fragment}*, got {[s.name for s in spans]}"
    )
    return matches[0]


def _parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, f"{span.name} has no parent"
    return span.parent.span_id


async def test_one_process_trace_covers_every_hop(mesh: Mesh) -> None:
    channel, client_spans, provider = _client(mesh.address)
    async with channel:
        reply = await inference_pb2_grpc.InferenceServiceStub(channel).Complete(
            user_request("What payment methods do you accept?"), metadata=AUTH, timeout=10
        )
    await mesh.running.stop(grace=1)  # lets the off-path cache store finish
    spans = [*client_spans.get_finished_spans(), *mesh.spans.get_finished_spans()]
    provider.shutdown()

    assert {format_trace_id(s.context.trace_id) for s in spans} == {reply.trace_id}
    client = _named(spans, "InferenceService/Complete", SpanKind.CLIENT)
    front = _named(spans, "InferenceService/Complete", SpanKind.SERVER)
    assert _parent_of(front) == client.context.span_id
    for hop in (
        "CacheService/Lookup",
        "RouterService/Route",
        "CacheService/Store",
        "LedgerService/RecordUsage",
    ):
        # In one process a hop is a direct call: no client span, the callee's server
        # span is the front's child and says how it was reached.
        assert not [s for s in spans if hop in s.name and s.kind == SpanKind.CLIENT], hop
        incoming = _named(spans, hop, SpanKind.SERVER)
        assert _parent_of(incoming) == front.context.span_id, hop
        assert incoming.attributes is not None
        assert incoming.attributes["costmesh.transport"] == "in-process", hop
        assert incoming.attributes["rpc.grpc.status_code"] == 0, hop
    llm = _named(spans, "chat gpt-4o-mini", SpanKind.CLIENT)
    assert _parent_of(llm) == front.context.span_id
    assert llm.attributes is not None
    assert llm.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert llm.attributes["gen_ai.usage.output_tokens"] == reply.usage.output_tokens
    assert front.attributes is not None
    assert front.attributes["costmesh.team"] == "demo"
    assert front.attributes["costmesh.cache.outcome"] == "CACHE_OUTCOME_MISS"
    route = _named(spans, "RouterService/Route", SpanKind.SERVER)
    assert route.attributes is not None
    assert route.attributes["costmesh.route.model"] == "gpt-4o-mini"
    tier = types_pb2.Tier.Name(reply.tier).removeprefix("TIER_").lower()
    assert route.attributes["costmesh.route.tier"] == tier
    assert route.attributes["costmesh.route.reason"] == reply.route_reason
    lookup = _named(spans, "CacheService/Lookup", SpanKind.SERVER)
    assert lookup.attributes is not None
    assert lookup.attributes["costmesh.cache.hit"] is False
    ledger = _named(spans, "LedgerService/RecordUsage", SpanKind.SERVER)
    assert ledger.attributes is not None
    assert ledger.attributes["costmesh.ledger.records"] == 1
    assert ledger.attributes["costmesh.ledger.duplicates"] == 0
    prompt = "Where is my refund?"
    assert all(prompt not in str(s.attributes) for s in spans), "prompt text stays off spans"


@pytest.fixture
async def four_processes(
    simulator: OpenAISimulator, tmp_path: Path
) -> AsyncIterator[tuple[str, OtlpReceiver]]:
    receiver = OtlpReceiver()
    endpoint = await receiver.start()
    base = {
        **os.environ,
        "COSTMESH_SERVICE_KEY": SERVICE_KEY,
        "COSTMESH_DATA_DIR": str(tmp_path),
        "OPENAI_API_KEY": PROVIDER_KEY,
        "OPENAI_BASE_URL": simulator.base_url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    for name in (
        "OTEL_SERVICE_NAME",
        "CACHE_ADDR",
        "ROUTER_ADDR",
        "LEDGER_ADDR",
        "COSTMESH_CONFIG",
    ):
        base.pop(name, None)
    processes = []
    try:
        addresses = {}
        for service in ("cache", "router", "ledger"):
            process, addresses[service] = await start_service(service, base)
            processes.append(process)
        peers = {f"{s.upper()}_ADDR": a for s, a in addresses.items()}
        process, front = await start_service("inference", {**base, **peers})
        processes.append(process)
        yield front, receiver
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
        for process in processes:
            assert await process.wait() == 0, "every service shuts down cleanly on SIGTERM"
        await receiver.stop()


async def test_four_process_trace_has_one_trace_id_across_all_services(
    four_processes: tuple[str, OtlpReceiver],
) -> None:
    address, receiver = four_processes
    channel, client_spans, provider = _client(address)
    async with channel:
        reply = await inference_pb2_grpc.InferenceServiceStub(channel).Complete(
            user_request("Why was I charged twice?"), metadata=AUTH, timeout=20
        )
    client = client_spans.get_finished_spans()[0]
    provider.shutdown()
    services = {"costmesh-inference", "costmesh-cache", "costmesh-router", "costmesh-ledger"}

    expected_servers = {
        ("costmesh-inference", "/costmesh.inference.v1.InferenceService/Complete"),
        ("costmesh-cache", "/costmesh.cache.v1.CacheService/Lookup"),
        ("costmesh-cache", "/costmesh.cache.v1.CacheService/Store"),
        ("costmesh-router", "/costmesh.router.v1.RouterService/Route"),
        ("costmesh-ledger", "/costmesh.ledger.v1.LedgerService/RecordUsage"),
    }

    def complete(spans: list[ReceivedSpan]) -> bool:
        ours = [s for s in spans if s.trace_id == reply.trace_id]
        servers = {(s.service, s.name) for s in ours if s.kind == 2}  # SERVER
        ids = {s.span_id for s in ours}
        parents_arrived = all(
            s.parent_span_id in ids
            for s in ours
            if s.kind == 2 and s.service != "costmesh-inference"
        )
        return (
            servers >= expected_servers
            and parents_arrived
            and any(s.name.startswith("chat ") for s in ours)
        )

    await receiver.wait_for(complete, within=20)
    ours = [s for s in receiver.spans if s.trace_id == reply.trace_id]
    assert format_trace_id(client.context.trace_id) == reply.trace_id
    by_id = {s.span_id: s for s in ours}
    (front,) = [s for s in ours if s.service == "costmesh-inference" and s.kind == 2]  # SERVER
    assert front.parent_span_id == format_span_id(client.context.span_id)
    for service in services - {"costmesh-inference"}:
        served = [s for s in ours if s.service == service and s.kind == 2]
        assert served, f"{service} exported no server span"
        for span in served:
            caller = by_id[span.parent_span_id]
            assert caller.service == "costmesh-inference"
            assert caller.kind == 3  # CLIENT
            assert caller.parent_span_id == front.span_id
    (llm,) = [s for s in ours if s.name.startswith("chat ")]
    assert llm.parent_span_id == front.span_id
    assert llm.attributes["gen_ai.usage.input_tokens"] == reply.usage.input_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_the_provider_receives_the_trace_of_its_call(
    mesh: Mesh, simulator: OpenAISimulator, stream: bool
) -> None:
    """A provider that traces (vLLM, a gateway) joins the caller's trace under the
    provider call's own span."""
    request = user_request("What payment methods do you accept?")  # in the router's domain
    if stream:
        pieces = mesh.inference.StreamComplete(
            inference_pb2.StreamCompleteRequest(request=request), metadata=AUTH, timeout=10
        )
        trace_id = [p.summary async for p in pieces][-1].trace_id
    else:
        reply = await mesh.inference.Complete(request, metadata=AUTH, timeout=10)
        trace_id = reply.trace_id

    (traceparent,) = simulator.traceparents
    _, sent_trace, sent_parent, _ = traceparent.split("-")
    provider_call = _named(mesh.spans.get_finished_spans(), "chat gpt-4o-mini", SpanKind.CLIENT)
    assert sent_trace == trace_id
    assert sent_parent == format_span_id(provider_call.context.span_id)
