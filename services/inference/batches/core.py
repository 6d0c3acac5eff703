"""What both halves of provider batches share: their state, the job lock, and
recording results in the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator, Sequence

import openai
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from costmesh.ledger.v1 import ledger_pb2
from costmesh.router.v1 import router_pb2
from costmesh.types.v1 import types_pb2
from services.inference.batches.jobs import (
    COST_PENDING,
    LOOKUP_SLACK_SECONDS,
    METADATA_KEY,
    PART_KEY,
    RECORD_CONCURRENCY,
    UNRECORDED,
    Job,
    JobStore,
)
from services.inference.batches.lines import (
    gather_all,
    job_status,
)
from services.inference.outbox import UsageOutbox
from services.inference.peers import Peers
from services.inference.settings import InferenceSettings
from services.providers.client import Providers

log = logging.getLogger(__name__)


class JobsCore:
    """State shared by submitting and polling a job."""

    def __init__(
        self,
        settings: InferenceSettings,
        providers: Providers,
        peers: Peers,
        outbox: UsageOutbox,
        *,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._settings = settings
        self._providers = providers
        self._peers = peers
        self._outbox = outbox
        # The mesh's tracer reaches this class only through Providers until service.py
        # passes `tracer=`; the global one is the fallback (what `costmesh serve` sets).
        self._tracer = tracer or getattr(providers, "_tracer", None) or trace.get_tracer(__name__)
        self._store = JobStore(settings.batch_store_path)
        self._poller: asyncio.Task[None] | None = None
        self._submitting: set[asyncio.Future[str]] = set()
        self._rng = random.Random()  # retry jitter
        # One refresh of a job at a time (the poller and GetBatch may both try).
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _record(
        self,
        job: Job,
        request_id: str,
        route: router_pb2.RouteResponse,
        usage: types_pb2.TokenUsage,
    ) -> ledger_pb2.UsageRecord:
        """An answer's ledger row at the batch price; the time is now, once: the stored
        record is sent unchanged however often it is delivered."""
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        return ledger_pb2.UsageRecord(
            request_id=request_id,
            trace_id=job.trace_id,
            time=now,
            team=job.team,
            feature=job.feature,
            tier=route.tier,
            usage=usage,
            cache_outcome=types_pb2.CACHE_OUTCOME_BYPASS,
            batch=True,
            latency_ms=int((time.time() - job.created) * 1000),
            status=ledger_pb2.CALL_STATUS_OK,
            baseline_model=self._settings.features[job.feature].baseline_model,
            baseline_usage=usage,
            purpose=ledger_pb2.CALL_PURPOSE_ANSWER,
            route_probabilities=[
                types_pb2.TierProbability(tier=p.tier, probability=min(max(p.probability, 0), 1))
                for p in route.probabilities
            ],
            route_reason=route.reason[:1000],
        )

    async def _settle(self, job: Job) -> tuple[str, int, int]:
        """Hand every stored result to the ledger, then save the job's status: finished
        once every part is done and every result is in the outbox."""
        batch_id = job.batch_id
        await self._deliver(batch_id, await asyncio.to_thread(
            self._store.to_record, batch_id, (UNRECORDED, COST_PENDING)
        ))  # fmt: skip
        parts = await asyncio.to_thread(self._store.parts, batch_id)
        unrecorded = await asyncio.to_thread(self._store.to_record, batch_id, (UNRECORDED,))
        status = job_status(parts)
        finished = all(p.done for p in parts) and not unrecorded
        if finished != job.finished or status != job.status:
            await asyncio.to_thread(self._store.set_status, batch_id, status, finished)
        completed = sum(p.completed for p in parts)
        failed = sum(p.failed for p in parts)
        return status, completed, failed

    async def _deliver(self, batch_id: str, pending: Sequence[tuple[int, bytes]]) -> None:
        """Through the outbox, a few at a time. A record sent before is a repeat the ledger
        ignores, answering with the cost it holds: how a pending cost is learned."""
        gate = asyncio.Semaphore(RECORD_CONCURRENCY)

        async def deliver(index: int, blob: bytes) -> None:
            async with gate:
                record = ledger_pb2.UsageRecord.FromString(blob)
                result = await self._outbox.deliver(record, self._peers.timeout)
                cost = None if result is None else result.cost_nano_usd
                await asyncio.to_thread(self._store.recorded, batch_id, index, cost)

        await gather_all(deliver(index, blob) for index, blob in pending)

    @contextlib.asynccontextmanager
    async def _job_lock(self, batch_id: str) -> AsyncIterator[None]:
        lock = self._locks.get(batch_id)
        if lock is None:
            lock = self._locks[batch_id] = asyncio.Lock()
        async with lock:
            yield

    def _client(self, provider: str) -> openai.AsyncOpenAI:
        return self._providers.client(provider)[0]

    def _label(self, provider: str) -> str:
        return self._providers.client(provider)[1]

    async def _adopt(self, job: Job, number: int, provider: str) -> bool:
        """Find a provider batch of this part created by a call whose answer was lost."""
        client = self._client(provider)
        try:
            async for found in client.batches.list(limit=100):
                if found.created_at < job.created - LOOKUP_SLACK_SECONDS:
                    break
                metadata = found.metadata or {}
                if (metadata.get(METADATA_KEY), metadata.get(PART_KEY)) == (
                    job.batch_id, str(number)
                ):  # fmt: skip
                    log.info("found provider batch %s of %s", found.id, job.batch_id)
                    await asyncio.to_thread(
                        self._store.sent, job.batch_id, number, found.id, found.input_file_id
                    )
                    return True
        except openai.OpenAIError as exc:
            log.warning("could not look for the provider batch of %s: %r", job.batch_id, exc)
        return False
