"""The front door's HTTP server: uvicorn, in the mesh's own event loop."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import uvicorn

from services.common.tls import ServerTls


@dataclass
class RunningHttp:
    """A started HTTP server and the port it bound."""

    server: uvicorn.Server
    loop_task: asyncio.Task[None]
    sock: socket.socket
    port: int

    async def stop(self) -> None:
        """Stop accepting, give open requests the grace uvicorn allows, then close."""
        self.server.should_exit = True
        await self.loop_task
        await self.server.shutdown(sockets=[self.sock])


async def start_http(
    app: object, host: str, port: int, grace: float = 5.0, tls: ServerTls | None = None
) -> RunningHttp:
    """Bind `host:port` (0 picks a free port) and serve `app` until stopped; on stop,
    open requests (streams too) get `grace` seconds to finish.

    uvicorn's own `serve()` would take over SIGINT and SIGTERM; the mesh owns them
    (graceful shutdown of gRPC first), so the server's steps are run one by one."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio turns Nagle off (TCP_NODELAY) only on
    # sockets that say they are TCP, and with Nagle on, a reply's body waited for the
    # client's delayed ACK of its headers: 40 ms added to every call.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((bare, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} (HTTP front door): {exc}") from exc
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        http="httptools",  # a C parser (a dependency): h11 costs about 1 ms a call more
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=max(1, round(grace)),
        **({} if tls is None else tls.http_options()),  # type: ignore[arg-type]
    )
    try:
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[sock])
    except BaseException:
        sock.close()
        raise
    loop_task = asyncio.ensure_future(server.main_loop())
    return RunningHttp(server, loop_task, sock, int(sock.getsockname()[1]))
