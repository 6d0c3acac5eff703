"""InferenceService servicer: the front door; proto in, request path, proto out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import trace

from costmesh.cache.v1 import cache_pb2_grpc
from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.router.v1 import router_pb2_grpc
from services.common.auth import current_principal
from services.common.channels import Channels
from services.common.config import Config
from services.common.errors import InvalidArgument
from services.common.pricing import PriceCatalog
from services.common.server import ServiceDef
from services.inference import batches, queue
from services.inference.admission import Admission
from services.inference.answering import Answering
from services.inference.budgets import TeamBudgets
from services.inference.cache_port import CachePort
from services.inference.idempotency import IdempotencyStore
from services.inference.outbox import UsageOutbox
from services.inference.peers import LedgerPeer, Peers
from services.inference.request_path import CompletionPath
from services.inference.router_port import RouterPort
from services.inference.settings import InferenceSettings
from services.inference.usage_recording import UsageRecorder
from services.providers.client import Providers

log = logging.getLogger(__name__)
SERVICE_NAME = "costmesh.inference.v1.InferenceService"


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        path: CompletionPath,
        provider_batches: batches.ProviderBatches,
        micro_batches: queue.MicroBatchQueue,
    ) -> None:
        self._path = path
        self._batches = provider_batches
        self._queue = micro_batches

    async def Complete(
        self, request: inference_pb2.CompleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.CompleteResponse:
        return await self._path.complete(request, current_principal(), context.time_remaining())

    async def StreamComplete(
        self,
        request: inference_pb2.StreamCompleteRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[inference_pb2.StreamCompleteResponse]:
        stream = self._path.stream(request.request, current_principal(), context.time_remaining())
        async for message in stream:
            yield message

    async def SubmitBatch(
        self, request: inference_pb2.SubmitBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.SubmitBatchResponse:
        if request.mode == inference_pb2.BATCH_MODE_QUEUE:
            return await self._queue.submit(request, current_principal())
        if request.mode not in (inference_pb2.BATCH_MODE_UNSPECIFIED, batches.MODE):
            raise InvalidArgument("mode", f"unknown batch mode {request.mode}")
        return await self._batches.submit(request, current_principal())

    async def GetBatch(
        self, request: inference_pb2.GetBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> inference_pb2.GetBatchResponse:
        if request.batch_id.startswith(queue.PREFIX):
            return await self._queue.get(request.batch_id, current_principal())
        if request.batch_id.startswith(batches.PREFIX):
            return await self._batches.get(request.batch_id, current_principal())
        raise InvalidArgument("batch_id", f"not a batch id: {request.batch_id!r}")

    async def ReportWrongHit(
        self,
        request: inference_pb2.ReportWrongHitRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> inference_pb2.ReportWrongHitResponse:
        return await self._path.report_wrong_hit(request, current_principal())


def build(
    config: Config,
    env: Mapping[str, str],
    channels: Channels,
    addresses: Mapping[str, str],
    tracer_provider: trace.TracerProvider,
    *,
    stand_ins: Mapping[str, str] | None = None,
) -> ServiceDef:
    """The front door, talking to peers at `addresses` (cache, router, ledger)."""
    settings = InferenceSettings.from_config(config)
    tracer = tracer_provider.get_tracer("costmesh.inference")
    # First, since it may refuse (a missing key): nothing else is open yet.
    providers = Providers(settings.calls, env, tracer, stand_ins or {})
    ledger = LedgerPeer(
        ledger_pb2_grpc.LedgerServiceStub(channels.get(addresses["ledger"])),
        channels.metadata,
        channels.timeout,
    )

    peers = Peers(
        cache=cache_pb2_grpc.CacheServiceStub(channels.get(addresses["cache"])),
        router=router_pb2_grpc.RouterServiceStub(channels.get(addresses["router"])),
        metadata=channels.metadata,
        timeout=channels.timeout,
    )

    prices = _price_catalog(config, settings)
    budgets = TeamBudgets(settings.teams, prices, ledger.spend_since)

    async def delivered(
        results: Sequence[tuple[ledger_pb2.UsageRecord, ledger_pb2.RecordedUsage]],
    ) -> None:
        unpriced = []
        for record, result in results:
            budgets.acknowledged(record.team, record.request_id, result.cost_nano_usd)
            # A reply this process could not price was stored cost_pending: replays of
            # it carry the ledger's cost from now on.
            if record.client_request_id and not prices.knows(record.model):
                unpriced.append((record, result))
        for record, result in unpriced:
            await asyncio.to_thread(
                idempotency.settle,
                record.team,
                record.client_request_id,
                record.trace_id,
                result.cost_nano_usd,
                record.request_id,
            )

    def parked(records: Sequence[ledger_pb2.UsageRecord]) -> None:
        # Never billed: no longer on the way.
        for record in records:
            budgets.acknowledged(record.team, record.request_id, 0)

    outbox = UsageOutbox(
        settings.outbox_path, ledger.send, settings.outbox_retry_seconds, delivered, parked
    )
    # In the outbox's file: a response is remembered in the transaction of its rows.
    idempotency = IdempotencyStore(
        settings.outbox_path,
        settings.idempotency_ttl_seconds,
        earlier_file=settings.outbox_path.parent / "idempotency.sqlite3",  # before 2026-12
    )
    admission = Admission(settings, budgets)
    path = CompletionPath(
        settings,
        cache=CachePort(peers.cache, peers.metadata, peers.timeout),
        router=RouterPort(peers.router, peers.metadata, peers.timeout, settings),
        admission=admission,
        answering=Answering(settings, providers, admission),
        recorder=UsageRecorder(settings, prices, outbox, admission, peers.timeout),
        idempotency=idempotency,
        peer_timeout=peers.timeout,
    )
    provider_batches = batches.ProviderBatches(settings, providers, peers, outbox, tracer=tracer)
    micro_batches = queue.MicroBatchQueue(
        config, lambda r, p: path.complete(r, p, None), tracer=tracer
    )
    servicer = InferenceServicer(path, provider_batches, micro_batches)

    async def start() -> None:
        await outbox.start()
        await provider_batches.start()
        await micro_batches.start()

    async def stop() -> None:
        await micro_batches.stop()
        await provider_batches.stop()
        await path.drain()
        # Calls with a request_id finish in their own task, past the grace period:
        # their rows must reach the outbox before it closes.
        await idempotency.drain(peers.timeout)
        await outbox.stop()
        budgets.close()
        await providers.close()
        idempotency.close()

    return ServiceDef(
        SERVICE_NAME,
        lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server),
        start=start,
        stop=stop,
        settle=path.settled,
        calls_peers=True,
    )


def _price_catalog(config: Config, settings: InferenceSettings) -> PriceCatalog:
    """The ledger's prices, to tell a caller what its call cost without waiting for
    the ledger. A model this front cannot price (the ledger's config may) leaves its
    replies cost_pending, unless team limits need its price."""
    unpriced: list[str] = []
    prices = PriceCatalog.from_config(
        config.section("models"), config.section("ledger").get_str("price_version"), unpriced
    )
    if unpriced and settings.teams:
        PriceCatalog.from_config(config.section("models"), "")  # raises, naming the key
    if unpriced:
        log.warning("no price here for %s: their replies are cost_pending", ", ".join(unpriced))
    return prices
