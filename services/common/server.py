"""create_server / serve for grpc.aio: health, reflection, interceptors, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)


async def _nothing() -> None:
    return None


@dataclass(frozen=True)
class ServiceDef:
    """One gRPC service to host: how to add it to a server and its lifecycle hooks."""

    name: str
    register: Callable[[grpc.aio.Server], None]
    start: Callable[[], Awaitable[None]] = field(default=_nothing)
    stop: Callable[[], Awaitable[None]] = field(default=_nothing)


@dataclass
class RunningServer:
    """A started server and what it hosts."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    services: Sequence[ServiceDef]
    # Run after every service has stopped, e.g. closing client channels they used.
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING first so balancers drain, then let in-flight calls finish."""
        for service in self.services:
            await self.health.set(service.name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception:
                log.exception("stopping %s failed", service.name)
        for cleanup in self.cleanups:
            await cleanup()


async def create_server(
    host: str,
    port: int,
    build_services: Callable[[int], Sequence[ServiceDef]],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Bind first (port 0 picks a free one), then build the services knowing the port."""
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    bound = server.add_insecure_port(f"{host}:{port}")
    services = build_services(bound)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in services:
        service.register(server)
    names = [s.name for s in services]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    await server.start()
    for service in services:
        await service.start()
        await health_servicer.set(service.name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, bound, health_servicer, services)


async def serve(running: RunningServer, grace: float) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server_done = asyncio.ensure_future(running.server.wait_for_termination())
    stop_requested = asyncio.ensure_future(stop.wait())
    await asyncio.wait({server_done, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down; in-flight calls have %.1fs", grace)
    await running.stop(grace)
    for task in (server_done, stop_requested):
        task.cancel()
