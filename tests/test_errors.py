"""Bad input gets a clear status naming the field; the mesh stays up for the next call."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from costmesh.inference.v1 import inference_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from tests.conftest import AUTH, Mesh, user_request


def _details(error: grpc.aio.AioRpcError) -> tuple[str, list[str]]:
    """ErrorInfo reason and BadRequest fields from the rich status trailer."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert isinstance(raw, bytes), "every error carries a google.rpc.Status"
    status = status_pb2.Status.FromString(raw)
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            assert info.domain == "costmesh.dev"
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
    return reason, fields


def _with_max_tokens(value: int) -> inference_pb2.CompleteRequest:
    request = user_request("hello")
    request.params.max_tokens = value
    return request


BAD_REQUESTS = [
    (
        "empty messages",
        inference_pb2.CompleteRequest(feature="support"),
        ("messages", "INVALID_ARGUMENT"),
    ),
    ("unknown feature", user_request("hi", feature="nope"), ("feature", "UNKNOWN_FEATURE")),
    ("missing feature", user_request("hi", feature=""), ("feature", "INVALID_ARGUMENT")),
    ("negative max_tokens", _with_max_tokens(-5), ("params.max_tokens", "INVALID_ARGUMENT")),
    (
        "absurd max_tokens",
        _with_max_tokens(10_000_000),
        ("params.max_tokens", "MAX_TOKENS_OVER_LIMIT"),
    ),
    ("oversized prompt", user_request("word " * 40_000), ("messages", "PROMPT_TOO_LONG")),
    ("unknown model", user_request("hi", model="gpt-9000"), ("model", "UNKNOWN_MODEL")),
    (
        "role missing",
        inference_pb2.CompleteRequest(
            feature="support", messages=[types_pb2.ChatMessage(content="x")]
        ),
        ("messages[0].role", "INVALID_ARGUMENT"),
    ),
    (
        "no user message",
        inference_pb2.CompleteRequest(
            feature="support",
            messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_SYSTEM, content="x")],
        ),
        ("messages", "INVALID_ARGUMENT"),
    ),
]


@pytest.mark.parametrize(
    ("case", "request_", "expected"), BAD_REQUESTS, ids=[str(c[0]) for c in BAD_REQUESTS]
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    mesh: Mesh,
    simulator: OpenAISimulator,
    case: str,
    request_: inference_pb2.CompleteRequest,
    expected: tuple[str, str],
) -> None:
    field, reason = expected
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.inference.Complete(request_, metadata=AUTH, timeout=10)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    assert (caught.value.details() or "").startswith(field)
    assert _details(caught.value) == (reason, [field])
    assert simulator.call_count == 0, "nothing is spent on a bad request"
    ok = await mesh.inference.Complete(user_request("still up?"), metadata=AUTH, timeout=10)
    assert ok.content


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "API_KEY_MISSING"),
        ((("authorization", "Bearer not-a-key"),), "API_KEY_INVALID"),
        ((("authorization", "Basic abc"),), "API_KEY_INVALID"),
    ],
    ids=["missing", "unknown", "wrong scheme"],
)
async def test_missing_or_unknown_key_is_unauthenticated(
    mesh: Mesh, metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.inference.Complete(user_request("hi"), metadata=metadata, timeout=10)

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in (caught.value.details() or "")
    assert _details(caught.value)[0] == reason


async def test_invalid_utf8_in_metadata_is_refused_and_service_stays_up(mesh: Mesh) -> None:
    # gRPC itself refuses non-ASCII text header values at both ends, so invalid UTF-8
    # can only arrive as binary metadata: a key sent that way is not a key.
    bad = (("authorization-bin", b"\xff\xfe\x00"), ("x-costmesh-team-bin", b"\xc3\x28"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.inference.Complete(user_request("hi"), metadata=bad, timeout=10)

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (caught.value.details() or "").startswith("authorization")
    ok = await mesh.inference.Complete(
        user_request("after bad metadata"), metadata=AUTH, timeout=10
    )
    assert ok.content


async def test_provider_failure_maps_to_unavailable_then_recovers(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.fail_next(3, status=503)  # the SDK's own retries all fail too

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.inference.Complete(user_request("boom"), metadata=AUTH, timeout=20)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _details(caught.value)[0] == "PROVIDER_ERROR"
    ok = await mesh.inference.Complete(user_request("boom"), metadata=AUTH, timeout=10)
    assert not ok.cached
    spend = await mesh.ledger.QuerySpend(ledger_pb2.QuerySpendRequest(), metadata=AUTH, timeout=5)
    assert spend.rows[0].calls == 1, "a failed call is not billed"


async def test_member_keys_cannot_record_usage(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.ledger.RecordUsage(ledger_pb2.RecordUsageRequest(), metadata=AUTH, timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
