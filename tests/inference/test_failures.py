"""Peers failing: the cache fails open, a missing router is a clear UNAVAILABLE."""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from costmesh.inference.v1 import inference_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from services import SERVICES
from services.common.config import ConfigError, load_config
from services.inference.validation import estimate_tokens
from services.mesh import start_mesh
from tests.conftest import AUTH, Mesh, mesh_env, user_request

MeshWithout = Callable[[str], AbstractAsyncContextManager[tuple[str, InMemorySpanExporter]]]


def _dead_address() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture
def mesh_without(simulator: OpenAISimulator, tmp_path: Path) -> MeshWithout:
    @asynccontextmanager
    async def start(missing: str) -> AsyncIterator[tuple[str, InMemorySpanExporter]]:
        names = [n for n in ("cache", "router", "ledger", "inference") if n != missing]
        config_file = tmp_path / "c.toml"
        config_file.write_text(f'[peers]\n{missing} = "{_dead_address()}"\n')
        env = {**mesh_env(simulator, tmp_path), "COSTMESH_SERVICE_KEY": "cm-test-service"}
        spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(spans))
        running = await start_mesh(load_config(config_file, env), env, names, provider, port=0)
        try:
            yield f"127.0.0.1:{running.port}", spans
        finally:
            await running.stop(grace=1)

    return start


async def test_a_cache_outage_costs_a_miss_not_a_failed_request(
    mesh_without: MeshWithout, simulator: OpenAISimulator
) -> None:
    async with mesh_without("cache") as (address, spans), grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        first = await stub.Complete(user_request("Is the cache up?"), metadata=AUTH, timeout=10)
        second = await stub.Complete(user_request("Is the cache up?"), metadata=AUTH, timeout=10)

    assert first.content == second.content == "[simulated] Answer to: Is the cache up?"
    assert second.cache_outcome == types_pb2.CACHE_OUTCOME_MISS
    assert first.cost_nano_usd > 0
    assert simulator.call_count == 2
    events = [e.name for s in spans.get_finished_spans() for e in s.events]
    assert "cache.lookup_failed" in events, "the fail-open decision is on the trace"


async def test_a_router_outage_is_unavailable_naming_the_router(mesh_without: MeshWithout) -> None:
    async with mesh_without("router") as (address, _), grpc.aio.insecure_channel(address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await inference_pb2_grpc.InferenceServiceStub(ch).Complete(
                user_request("Route me"), metadata=AUTH, timeout=10
            )

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "router" in (caught.value.details() or "")


async def test_a_provider_that_reports_no_usage_is_billed_an_estimate_not_nothing(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.set_report_usage(False)
    question = "How long does a transfer take?"

    reply = await mesh.inference.Complete(user_request(question), metadata=AUTH, timeout=10)

    assert reply.usage.input_tokens == estimate_tokens(
        [types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=question)]
    )
    assert reply.usage.output_tokens == math.ceil(len(reply.content) / 4)
    assert reply.cost_nano_usd > 0
    (llm,) = [s for s in mesh.spans.get_finished_spans() if s.name.startswith("chat ")]
    assert llm.attributes is not None
    assert llm.attributes["costmesh.usage.estimated"] is True


async def test_provider_time_is_bounded_in_total_retries_included(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text("[inference]\nprovider_timeout_seconds = 0.5\n")
    env = mesh_env(simulator, tmp_path)
    running = await start_mesh(
        load_config(config_file, env), env, SERVICES, TracerProvider(), port=0
    )
    simulator.set_latency(0.2)
    simulator.fail_next(3, status=500)  # each failed attempt is followed by an SDK backoff
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await inference_pb2_grpc.InferenceServiceStub(channel).Complete(
                    user_request("Bounded?"), metadata=AUTH, timeout=10
                )
    finally:
        await running.stop(grace=1)

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(simulator.requests) < 3, "the SDK's retries were cut off by the total bound"


async def test_separate_inference_without_a_provider_key_refuses_to_start(tmp_path: Path) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text(
        '[peers]\ncache = "127.0.0.1:1"\nrouter = "127.0.0.1:1"\nledger = "127.0.0.1:1"\n'
    )
    env = {"COSTMESH_DATA_DIR": str(tmp_path), "COSTMESH_SERVICE_KEY": "cm-test-service"}

    with pytest.raises(ConfigError, match="set OPENAI_API_KEY"):
        await start_mesh(
            load_config(config_file, env), env, ["inference"], TracerProvider(), port=0
        )
