"""The HTTP server under the front door: bound as asked, without Nagle, stopped cleanly."""

from __future__ import annotations

import socket

import httpx2 as httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from services.front_door.server import start_http


async def _hello(request: object) -> PlainTextResponse:
    return PlainTextResponse("hello")


APP = Starlette(routes=[Route("/", _hello)])


async def test_it_serves_on_a_free_port_with_nagle_off_and_stops() -> None:
    running = await start_http(APP, "127.0.0.1", 0)
    try:
        # Nagle on would hold every reply's body for the client's delayed ACK (40 ms).
        assert running.sock.proto == socket.IPPROTO_TCP
        assert running.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        async with httpx.AsyncClient() as http:
            reply = await http.get(f"http://127.0.0.1:{running.port}/")
        assert reply.text == "hello"
    finally:
        await running.stop()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", running.port)) != 0  # nothing listens now


async def test_a_port_in_use_is_a_clear_error() -> None:
    running = await start_http(APP, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match="HTTP front door"):
            await start_http(APP, "127.0.0.1", running.port)
    finally:
        await running.stop()
