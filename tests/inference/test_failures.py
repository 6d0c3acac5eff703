"""Peers failing: the cache fails open, a missing router is a clear UNAVAILABLE."""

from __future__ import annotations

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
from services.common.config import load_config
from services.inference.simulator import OpenAISimulator
from services.mesh import start_mesh
from tests.conftest import AUTH, mesh_env, user_request

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
