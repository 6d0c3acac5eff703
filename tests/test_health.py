"""Health needs no key and names each service; reflection lists the contracts."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.inference.simulator import OpenAISimulator
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


async def test_reflection_lists_every_service_without_a_key(mesh: Mesh) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(mesh.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names: set[str] = set()
    async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
        names |= {s.name for s in reply.list_services_response.service}
    assert set(FULL_NAMES) <= names
    assert "grpc.health.v1.Health" in names


async def test_shutdown_drains_in_flight_calls_and_reports_not_serving(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.set_latency(0.5)
    health = health_pb2_grpc.HealthStub(mesh.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=FULL_NAMES[3]))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

    in_flight = asyncio.ensure_future(
        mesh.inference.Complete(user_request("slow one"), metadata=AUTH, timeout=10)
    )
    assert await asyncio.to_thread(simulator.wait_for_arrivals, 1, 5.0), "call reached the provider"
    stopping = asyncio.ensure_future(mesh.running.stop(grace=5))

    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    reply = await in_flight
    await stopping
    assert reply.content == "[simulated] Answer to: slow one"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.inference.Complete(user_request("too late"), metadata=AUTH, timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
