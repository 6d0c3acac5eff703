"""create_server / serve for grpc.aio: health, reflection, interceptors, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import reflection
from services.common.in_process import IN_PROCESS, InProcessServer
from services.common.tls import ServerTls

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
    # True for a service that calls its peers while it works (inference): it is
    # stopped while those peers still answer, so its last calls and flushes land.
    calls_peers: bool = False
    # Waits until work accepted so far has reached its peers (usage rows the ledger
    # gets after the reply): for demos and tests that read the ledger at once.
    settle: Callable[[], Awaitable[None]] = field(default=_nothing)


@dataclass
class RunningServer:
    """A started server and what it hosts."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    services: Sequence[ServiceDef]
    # The same services for calls between services of this process, without a
    # socket: they still answer while the public server drains during shutdown.
    local: InProcessServer | None = None
    # Run after every service has stopped, e.g. closing client channels they used.
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Other doors into the same services (the HTTP front door), closed first.
    doors: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    http_port: int = 0

    async def settled(self) -> None:
        """Every hosted service has handed on the work it accepted so far."""
        for service in self.services:
            await service.settle()

    async def stop(self, grace: float) -> None:
        """NOT_SERVING first so balancers drain, then let in-flight calls finish, on
        gRPC and the other doors alike, before the services stop."""
        for service in self.services:
            await self.health.set(service.name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), *(_close(door) for door in self.doors))
        await _stop_each([s for s in reversed(self.services) if s.calls_peers])
        await _stop_each([s for s in reversed(self.services) if not s.calls_peers])
        for cleanup in self.cleanups:
            await cleanup()


async def _close(door: Callable[[], Awaitable[None]]) -> None:
    try:
        await door()
    except Exception:  # the services behind it must stop all the same
        log.exception("closing a door (the HTTP front door) failed")


async def _stop_each(services: Sequence[ServiceDef]) -> None:
    for service in services:
        try:
            await service.stop()
        except Exception:
            log.exception("stopping %s failed", service.name)


def _new_server(interceptors: Sequence[grpc.aio.ServerInterceptor]) -> grpc.aio.Server:
    # so_reuseport off: a port already taken must fail loudly, not be shared.
    return grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])


def _bind(server: grpc.aio.Server, address: str, tls: ServerTls | None) -> int:
    try:
        if tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, tls.grpc_credentials())
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from exc


async def create_server(
    host: str,
    port: int,
    build_services: Callable[[str], Awaitable[Sequence[ServiceDef]]],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    *,
    local: InProcessServer | None = None,
    tls: ServerTls | None = None,
) -> RunningServer:
    """Bind first (port 0 picks a free one), then build the services knowing the
    address at which they reach each other: IN_PROCESS when `local` is given (the
    services are registered on it too), else this server's own.
    If anything fails on the way, whatever was opened is closed again."""
    server = _new_server(interceptors)
    bound = _bind(server, f"{host}:{port}", tls)
    running = RunningServer(server, bound, health.aio.HealthServicer(), [], local)
    try:
        address = IN_PROCESS if local is not None else f"{_dial_host(host)}:{bound}"
        running.services = await build_services(address)
        await _start(running)
    except BaseException:
        await _abandon(running)
        raise
    return running


async def _abandon(running: RunningServer) -> None:
    """Undo a start that failed. grpc releases a bound port only when a started server
    stops, so the servers are started (with nothing registered yet, or the services
    already stopping) just to be stopped."""
    await running.server.start()  # harmless when it already runs
    await running.stop(grace=0)


async def _start(running: RunningServer) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(running.health, running.server)
    for service in running.services:
        service.register(running.server)
        if running.local is not None:
            service.register(running.local)  # type: ignore[arg-type]
    names = [s.name for s in running.services]
    reflection.enable([*names, health.SERVICE_NAME], running.server)
    await running.server.start()
    for service in running.services:
        await service.start()
        await running.health.set(service.name, health_pb2.HealthCheckResponse.SERVING)
    await running.health.set("", health_pb2.HealthCheckResponse.SERVING)


def _dial_host(host: str) -> str:
    """The address to dial a server bound to `host`: a wildcard is dialled on loopback."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return host


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
