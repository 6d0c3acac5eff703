"""Every RPC, called as every kind of caller, against the access table and the table in
docs/security.md; under mTLS, a service is the name on its certificate."""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import descriptor_pool
from opentelemetry.sdk.trace import TracerProvider

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.inference.v1 import inference_pb2  # noqa: F401 - registers the descriptors
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.router.v1 import router_pb2  # noqa: F401
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from costmesh_tools.certs import Authority, issue, make_dev_set, write_pair
from services import SERVICES
from services.common.access import ACCESS, ADMIN, INFERENCE, MEMBER
from services.common.auth import hash_key
from services.common.config import load_config
from services.mesh import start_mesh
from tests.conftest import SERVICE_AUTH, mesh_env

ROOT = Path(__file__).resolve().parents[2]
MEMBER_KEY, ADMIN_KEY = "cm-member-of-team-a", "cm-admin-of-ops"
CALLERS = {
    MEMBER: (("authorization", f"Bearer {MEMBER_KEY}"),),
    ADMIN: (("authorization", f"Bearer {ADMIN_KEY}"),),
    INFERENCE: SERVICE_AUTH,
}
SERVICE_NAMES = [
    "costmesh.inference.v1.InferenceService",
    "costmesh.cache.v1.CacheService",
    "costmesh.router.v1.RouterService",
    "costmesh.ledger.v1.LedgerService",
]


def _every_rpc() -> list[tuple[str, bool]]:
    """(method path, server streaming) of every RPC the protos declare."""
    pool = descriptor_pool.Default()
    return [
        (f"/{name}/{method.name}", method.server_streaming)
        for name in SERVICE_NAMES
        for method in pool.FindServiceByName(name).methods
    ]


def test_the_table_covers_every_rpc_and_the_docs_show_it() -> None:
    assert sorted(ACCESS) == sorted(m for m, _ in _every_rpc())
    documented = {}
    for row in re.findall(
        r"^\| `(\w+)/(\w+)` \| (.+) \|$", (ROOT / "docs/security.md").read_text(), re.M
    ):
        service, method, cells = row
        package = service.removesuffix("Service").lower()
        allowed = [c.strip() == "yes" for c in cells.split("|")]
        documented[f"/costmesh.{package}.v1.{service}/{method}"] = {
            g for g, yes in zip((MEMBER, ADMIN, INFERENCE), allowed, strict=True) if yes
        }
    assert documented == {m: set(g) for m, g in ACCESS.items()}


@pytest.fixture
async def address(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[str]:
    config = tmp_path / "keys.toml"
    config.write_text(
        f'[[auth.keys]]\nteam = "team-a"\nrole = "member"\nsha256 = "{hash_key(MEMBER_KEY)}"\n'
        f'[[auth.keys]]\nteam = "ops"\nrole = "admin"\nsha256 = "{hash_key(ADMIN_KEY)}"\n'
    )
    env = mesh_env(simulator, tmp_path)
    running = await start_mesh(load_config(config, env=env), env, SERVICES, TracerProvider(), 0)
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        await running.stop(grace=1)


async def _code(channel: grpc.aio.Channel, method: str, streaming: bool, caller: str) -> str:
    """The status of `method` called with an empty request as `caller`."""
    metadata = CALLERS[caller]
    try:
        if streaming:
            open_stream: Any = channel.unary_stream(method)
            stream = open_stream(b"", metadata=metadata, timeout=10)
            async for _ in stream:
                pass
        else:
            unary: Any = channel.unary_unary(method)
            await unary(b"", metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


async def test_every_rpc_answers_every_caller_as_the_table_says(address: str) -> None:
    """Allowed: anything but PERMISSION_DENIED (an empty request is often invalid);
    refused: PERMISSION_DENIED before the request is looked at."""
    seen = {}
    async with grpc.aio.insecure_channel(address) as channel:
        for method, streaming in _every_rpc():
            for caller in CALLERS:
                seen[method, caller] = await _code(channel, method, streaming, caller)
    refused = {k for k, code in seen.items() if code == "PERMISSION_DENIED"}
    expected = {(m, c) for m, _ in _every_rpc() for c in CALLERS if c not in ACCESS[m]}
    assert refused == expected
    assert "UNKNOWN" not in seen.values()
    assert "INTERNAL" not in seen.values()


async def test_an_admin_reaches_a_team_cache_only_by_naming_it_and_is_logged(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    question = [types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Opening hours?")]
    async with grpc.aio.insecure_channel(address) as channel:
        cache = cache_pb2_grpc.CacheServiceStub(channel)
        unnamed_key = cache_pb2.CacheKey(feature="support", messages=question)
        with pytest.raises(grpc.aio.AioRpcError) as unnamed:
            await cache.Lookup(
                cache_pb2.LookupRequest(key=unnamed_key), metadata=CALLERS[ADMIN], timeout=10
            )
        with caplog.at_level(logging.INFO, logger="costmesh.audit"):
            named = cache_pb2.CacheKey(team="team-a", feature="support", messages=question)
            await cache.Lookup(
                cache_pb2.LookupRequest(key=named), metadata=CALLERS[ADMIN], timeout=10
            )
            await cache.Lookup(
                cache_pb2.LookupRequest(key=named), metadata=SERVICE_AUTH, timeout=10
            )

    assert unnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (unnamed.value.details() or "").startswith("key.team")
    audit = [r.getMessage() for r in caplog.records if r.name == "costmesh.audit"]
    assert audit == ["cache Lookup by an admin of team ops: team team-a's cache"]


async def test_under_mtls_the_service_key_is_only_as_good_as_the_certificate_with_it(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    make_dev_set(certs)
    authority = Authority(
        x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes()),
        serialization.load_pem_private_key((certs / "ca-key.pem").read_bytes(), None),  # type: ignore[arg-type]
    )
    write_pair(certs, "star", *issue(authority, "*", ["localhost"]))
    write_pair(certs, "nameless", *_nameless(authority))
    env = {
        **mesh_env(simulator, tmp_path),
        "COSTMESH_TLS_CERT_FILE": str(certs / "ledger.pem"),
        "COSTMESH_TLS_KEY_FILE": str(certs / "ledger-key.pem"),
        "COSTMESH_TLS_CLIENT_CA_FILE": str(certs / "ca.pem"),
    }
    ledger = await start_mesh(load_config(env=env), env, ["ledger"], TracerProvider(), port=0)
    record = ledger_pb2.UsageRecord(
        request_id="r1", team="team-a", feature="support", model="gpt-4o-mini",
        provider="openai", status=ledger_pb2.CALL_STATUS_OK,
        purpose=ledger_pb2.CALL_PURPOSE_ANSWER,
    )  # fmt: skip
    record.time.GetCurrentTime()
    codes = {}
    try:
        for name in ("cache", "star", "nameless", "inference"):
            credentials = grpc.ssl_channel_credentials(
                (certs / "ca.pem").read_bytes(),
                (certs / f"{name}-key.pem").read_bytes(),
                (certs / f"{name}.pem").read_bytes(),
            )
            async with grpc.aio.secure_channel(f"localhost:{ledger.port}", credentials) as channel:
                stub = ledger_pb2_grpc.LedgerServiceStub(channel)
                try:
                    await stub.RecordUsage(
                        ledger_pb2.RecordUsageRequest(records=[record]),
                        metadata=SERVICE_AUTH, timeout=10,
                    )  # fmt: skip
                    codes[name] = "OK"
                except grpc.aio.AioRpcError as exc:
                    codes[name] = f"{exc.code().name}: {exc.details()}"
    finally:
        await ledger.stop(grace=1)

    refused = (
        "PERMISSION_DENIED: RecordUsage: not allowed for service:{} (allowed: service:inference)"
    )
    assert codes == {
        "cache": refused.format("cache"),
        "star": refused.format("(unnamed)"),
        "nameless": refused.format("(unnamed)"),
        "inference": "OK",
    }


def _nameless(authority: Authority) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate from the mesh's CA with an empty subject (SAN only), as some CAs
    issue them: it names no service."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("inference")]), critical=True)
        .sign(authority.key, hashes.SHA256())
    )
    return cert, key
