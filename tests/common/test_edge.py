"""The servicer edge: an unexpected crash is INTERNAL without its text, and the server lives on."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from services.common.auth import KeyTable, Principal, current_principal, hash_key
from services.common.edge import EdgeInterceptor

KEY = "cm-edge-test"
AUTH = (("authorization", f"Bearer {KEY}"),)


async def _explode(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    raise RuntimeError("database password is hunter2")


async def _whoami(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return current_principal().team.encode()


async def _stream_explode(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    yield b"first"
    raise RuntimeError("secret in a stream")


async def _count(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> bytes:
    return str(len([r async for r in requests])).encode()


async def _echo(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request + current_principal().team.encode()


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    keys = KeyTable({hash_key(KEY): Principal("edge-team", "member")})
    methods = ("Explode", "WhoAmI", "StreamExplode", "Count", "Echo")
    table = {f"/test.Edge/{m}": frozenset({"member"}) for m in methods}
    server = grpc.aio.server(interceptors=[EdgeInterceptor(keys, table)])
    handler = grpc.method_handlers_generic_handler(
        "test.Edge",
        {
            "Explode": grpc.unary_unary_rpc_method_handler(_explode),
            "WhoAmI": grpc.unary_unary_rpc_method_handler(_whoami),
            "StreamExplode": grpc.unary_stream_rpc_method_handler(_stream_explode),
            "Count": grpc.stream_unary_rpc_method_handler(_count),
            "Echo": grpc.stream_stream_rpc_method_handler(_echo),
        },
    )
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(0)


async def test_unexpected_errors_are_internal_and_leak_nothing(channel: grpc.aio.Channel) -> None:
    explode: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/test.Edge/Explode"
    )
    whoami: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/test.Edge/WhoAmI"
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await explode(b"", metadata=AUTH, timeout=5)

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in (caught.value.details() or "")
    assert await whoami(b"", metadata=AUTH, timeout=5) == b"edge-team"


async def test_a_stream_that_crashes_midway_ends_internal(channel: grpc.aio.Channel) -> None:
    stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
        "/test.Edge/StreamExplode"
    )
    call = stream(b"", metadata=AUTH, timeout=5)
    first = await call.read()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()

    assert first == b"first"
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (caught.value.details() or "")


async def test_the_principal_is_set_only_for_authenticated_calls(channel: grpc.aio.Channel) -> None:
    whoami: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/test.Edge/WhoAmI"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await whoami(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_client_and_bidi_streaming_calls_are_authenticated_too(
    channel: grpc.aio.Channel,
) -> None:
    count: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
        "/test.Edge/Count"
    )
    echo: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
        "/test.Edge/Echo"
    )

    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await count(iter([b"a", b"b"]), timeout=5)
    counted = await count(iter([b"a", b"b"]), metadata=AUTH, timeout=5)
    echoed = [m async for m in echo(iter([b"hi:"]), metadata=AUTH, timeout=5)]
    with pytest.raises(grpc.aio.AioRpcError) as anonymous_bidi:
        await echo(iter([b"hi:"]), timeout=5).read()

    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert anonymous_bidi.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert counted == b"2"
    assert echoed == [b"hi:edge-team"]
