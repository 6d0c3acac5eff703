"""Health needs no key and names each service; reflection lists the contracts."""

from __future__ import annotations

import asyncio
import sqlite3

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from costmesh_simulator import OpenAISimulator
from tests.conftest import AUTH, Mesh, user_request

FULL_NAMES = [
    "costmesh.cache.v1.CacheService",
    "costmesh.router.v1.RouterService",
    "costmesh.ledger.v1.LedgerService",
    "costmesh.inference.v1.InferenceService",
]


@pytest.mark.parametrize("service", ["", *FULL_NAMES])
async def test_health_reports_each_service_by_full_name_without_a_key(
    mesh: Mesh, service: str
) -> None:
    reply = await health_pb2_grpc.HealthStub(mesh.channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_of_an_unknown_service_is_not_found(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_pb2_grpc.HealthStub(mesh.channel).Check(
            health_pb2.HealthCheckRequest(service="costmesh.nothing.v1.Nope"), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_every_service_without_a_key(mesh: Mesh, version: str) -> None:
    """Under v1 (what grpcurl and current tools ask first) and v1alpha (older ones)."""
    call = mesh.channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names: set[str] = set()
    async for reply in call(iter([request]), timeout=5):
        names |= {s.name for s in reply.list_services_response.service}
    assert set(FULL_NAMES) <= names
    assert {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names

    described = reflection_pb2.ServerReflectionRequest(file_containing_symbol=FULL_NAMES[3])
    async for reply in call(iter([described]), timeout=5):
        assert reply.file_descriptor_response.file_descriptor_proto


async def test_shutdown_drains_in_flight_calls_and_reports_not_serving(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.set_latency(0.5)
    health = health_pb2_grpc.HealthStub(mesh.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=FULL_NAMES[3]))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    in_flight = [
        asyncio.ensure_future(
            mesh.inference.Complete(user_request(f"slow {i}"), metadata=AUTH, timeout=10)
        )
        for i in range(2)
    ]
    assert await asyncio.to_thread(simulator.wait_for_arrivals, 2, 5.0), "calls reached provider"
    stopping = asyncio.ensure_future(mesh.running.stop(grace=5))

    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    replies = await asyncio.gather(*in_flight)
    await stopping
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.inference.Complete(user_request("too late"), metadata=AUTH, timeout=2)
    with sqlite3.connect(mesh.data_dir / "ledger.sqlite3") as ledger:
        recorded = dict(ledger.execute("SELECT request_id, cost_nano_usd FROM usage").fetchall())
    with sqlite3.connect(mesh.data_dir / "outbox.sqlite3") as outbox:
        (pending,) = outbox.execute("SELECT COUNT(*) FROM outbox").fetchone()

    assert [r.content for r in replies] == [
        "[simulated] Answer to: slow 0",
        "[simulated] Answer to: slow 1",
    ]
    assert not any(r.cost_pending for r in replies), "drained calls still reach the ledger"
    assert recorded == {r.request_id: r.cost_nano_usd for r in replies}
    assert pending == 0
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
