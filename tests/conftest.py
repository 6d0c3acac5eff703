"""Fixtures shared by the whole suite: a provider simulator and an in-process mesh."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import metrics
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from costmesh.cache.v1 import cache_pb2_grpc
from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.router.v1 import router_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from services import SERVICES
from services.common.config import load_config
from services.common.metrics import setup_metrics
from services.common.server import RunningServer
from services.mesh import start_mesh

# `costmesh serve` processes the suite starts open no HTTP port unless a test asks
# for one of its own: 8080 would be shared by every one of them.
os.environ.setdefault("COSTMESH_HTTP_PORT", "0")
# One meter provider for the session, as `costmesh serve` installs one per process:
# tests read what their own calls added (their own feature or team names).
METERING = setup_metrics("costmesh-tests", {})
metrics.set_meter_provider(METERING.provider)

DEMO_KEY = "cm-demo-admin-key"
AUTH = (("authorization", f"Bearer {DEMO_KEY}"),)
PROVIDER_KEY = "sk-test-provider"
# The services' own key in test meshes: what inference shows its peers. Calls only
# inference may make (Route, RecordUsage, a team's cache) use it.
SERVICE_KEY = "cm-test-service-key"
SERVICE_AUTH = (("authorization", f"Bearer {SERVICE_KEY}"),)


@pytest.fixture
def simulator() -> Iterator[OpenAISimulator]:
    with OpenAISimulator(api_key=PROVIDER_KEY) as sim:
        yield sim


@dataclass
class Mesh:
    """A running in-process mesh and clients for it."""

    running: RunningServer
    address: str
    channel: grpc.aio.Channel
    spans: InMemorySpanExporter
    data_dir: Path

    @property
    def inference(self) -> inference_pb2_grpc.InferenceServiceAsyncStub:
        return inference_pb2_grpc.InferenceServiceStub(self.channel)

    @property
    def ledger(self) -> ledger_pb2_grpc.LedgerServiceAsyncStub:
        return ledger_pb2_grpc.LedgerServiceStub(self.channel)

    @property
    def cache(self) -> cache_pb2_grpc.CacheServiceAsyncStub:
        return cache_pb2_grpc.CacheServiceStub(self.channel)

    @property
    def router(self) -> router_pb2_grpc.RouterServiceAsyncStub:
        return router_pb2_grpc.RouterServiceStub(self.channel)


class _ReadYourWrites:
    """Before a test reads the ledger, the usage rows of the calls already answered
    reach it: inference writes them to its outbox and delivers them just after the
    reply, so a read straight after a reply could otherwise miss them."""

    def __init__(self, running: RunningServer) -> None:
        self.running = running

    async def _settle(self, method: str | bytes) -> None:
        name = method.decode() if isinstance(method, bytes) else method
        if name.startswith("/costmesh.ledger.v1.LedgerService/"):
            await self.running.settled()


class _ReadYourWritesUnary(_ReadYourWrites, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        await self._settle(client_call_details.method)
        return await continuation(client_call_details, request)


class _ReadYourWritesStream(_ReadYourWrites, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        await self._settle(client_call_details.method)
        return await continuation(client_call_details, request)


def read_your_writes(running: RunningServer) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for a test's channel to `running` (grpc takes one kind each)."""
    return [_ReadYourWritesUnary(running), _ReadYourWritesStream(running)]


def mesh_env(simulator: OpenAISimulator, data_dir: Path) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": PROVIDER_KEY,
        "OPENAI_BASE_URL": simulator.base_url,
        "COSTMESH_DATA_DIR": str(data_dir),
        "COSTMESH_SERVICE_KEY": SERVICE_KEY,
    }


@asynccontextmanager
async def running_mesh(
    simulator: OpenAISimulator, tmp_path: Path, config_text: str = "", *, http: bool = False
) -> AsyncIterator[Mesh]:
    """The whole mesh in this process, with `config_text` (TOML) merged over the
    embedded defaults and every span recorded."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    env = mesh_env(simulator, tmp_path)
    config = None
    if config_text:
        config = tmp_path / "mesh.toml"
        config.write_text(config_text)
    running = await start_mesh(
        load_config(config, env=env),
        env,
        SERVICES,
        provider,
        port=0,
        http_port=0 if http else None,
        metering=METERING,
    )
    address = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(address, interceptors=read_your_writes(running))
    try:
        yield Mesh(running, address, channel, spans, tmp_path)
    finally:
        await channel.close()
        await running.stop(grace=1)
        provider.shutdown()


@pytest.fixture
async def mesh(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(simulator, tmp_path) as running:
        yield running


def user_request(
    text: str, feature: str = "support", **fields: object
) -> inference_pb2.CompleteRequest:
    return inference_pb2.CompleteRequest(
        feature=feature,
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
        **fields,  # type: ignore[arg-type]
    )


async def ledger_rows(mesh: Mesh) -> list[ledger_pb2.UsageRecord]:
    """Every usage row the mesh's ledger holds, through ExportUsage."""
    stream = mesh.ledger.ExportUsage(ledger_pb2.ExportUsageRequest(), metadata=AUTH, timeout=5)
    return [item.record async for item in stream]


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields an INVALID_ARGUMENT names in its google.rpc BadRequest detail."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert isinstance(raw, bytes)
    fields = []
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields
