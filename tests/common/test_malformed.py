"""Bytes that are not the method's message get INVALID_ARGUMENT, never grpc's UNKNOWN
with a Python exception's name, and no traceback in the log."""

from __future__ import annotations

import logging

import grpc
import pytest

from tests.conftest import SERVICE_AUTH, Mesh

# RouteRequest.feature (field 1, a string) holding bytes that are not UTF-8, and a
# length that runs past the end of the message.
NOT_UTF8 = b"\x0a\x02\xff\xfe"
TRUNCATED = b"\x0a\x7f" + b"x" * 3


@pytest.mark.parametrize("payload", [NOT_UTF8, TRUNCATED], ids=["not utf-8", "truncated"])
async def test_a_malformed_request_is_invalid_argument(
    mesh: Mesh, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    route: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = mesh.channel.unary_unary(
        "/costmesh.router.v1.RouterService/Route"
    )

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await route(payload, metadata=SERVICE_AUTH, timeout=5)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("request: not a valid message")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_malformed_request_without_a_key_is_unauthenticated_first(mesh: Mesh) -> None:
    route: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = mesh.channel.unary_unary(
        "/costmesh.router.v1.RouterService/Route"
    )

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await route(NOT_UTF8, timeout=5)

    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
