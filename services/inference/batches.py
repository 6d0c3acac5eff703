"""SubmitBatch through the provider's batch API (BATCH_MODE_PROVIDER): half price, 24 hours.

A batch is checked whole (any invalid request refuses it, naming the field), each
request is routed like a Complete, and the requests go to the providers' Batch APIs as
JSONL files: one provider batch per model of each provider (OpenAI wants one model per
input file), split further only if a file would pass the provider's size limit.

Everything lives in a SQLite job store (settings.batch_store_path) written before any
provider is called and before SubmitBatch returns, so a restart resumes polling the
jobs in flight. Results are stored when their provider batch ends, and each answer is
written to the ledger once, through the outbox, under a deterministic request id
(`<batch id>:<index>`): however often GetBatch is called and whatever restarts
happen, the ledger ignores a repeat, so every answer is billed exactly once, at the
batch price. Failed lines are not billed (providers do not charge for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import grpc
import openai
from google.protobuf import timestamp_pb2
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, TraceFlags

from costmesh.inference.v1 import inference_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh.router.v1 import router_pb2
from costmesh.types.v1 import types_pb2
from services.common.auth import Principal
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.sqlite import open_database
from services.inference.batch_requests import BatchRules, check_batch
from services.inference.outbox import UsageOutbox
from services.inference.peers import Peers
from services.inference.settings import InferenceSettings
from services.inference.validation import (
    check_context_window,
    estimate_tokens,
    openai_response_format,
)
from services.providers.client import Providers
from services.providers.resilience import retry_after, retryable

log = logging.getLogger(__name__)
PREFIX = "batch_"
MODE = inference_pb2.BATCH_MODE_PROVIDER
MAX_REQUESTS = 50_000
RULES = BatchRules(max_requests=MAX_REQUESTS, feature_required=True, experiments=False)
# OpenAI takes input files up to 200 MB; a part is cut below that, with room to spare.
MAX_FILE_BYTES = 190 * 1024 * 1024
ENDPOINT: Final = "/v1/chat/completions"
COMPLETION_WINDOW: Final = "24h"
# Provider batches carry the costmesh batch id, so one created by a call whose answer
# was lost (a timeout, a crash before the id was stored) can be found again.
METADATA_KEY = "costmesh_batch_id"
PART_KEY = "costmesh_part"
# How far back (seconds before the job was created) a lost provider batch is looked for.
LOOKUP_SLACK_SECONDS = 3600
ROUTE_CONCURRENCY = 16
RECORD_CONCURRENCY = 16
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Unfinished provider statuses, least advanced first: a job shows its slowest part's.
PROGRESS = ("submitting", "validating", "in_progress", "finalizing", "cancelling")
_ROLES = {
    types_pb2.ROLE_SYSTEM: "system",
    types_pb2.ROLE_USER: "user",
    types_pb2.ROLE_ASSISTANT: "assistant",
}
# How a failed line's HTTP status reads as a gRPC status name.
_HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "FAILED_PRECONDITION", 403: "FAILED_PRECONDITION",
               404: "NOT_FOUND", 409: "ABORTED", 422: "INVALID_ARGUMENT",
               429: "RESOURCE_EXHAUSTED"}  # fmt: skip
# Why a request has no line at all once its provider batch ended, by that batch's status.
_UNANSWERED = {
    "expired": ("DEADLINE_EXCEEDED", "the provider's 24-hour completion window expired"),
    "cancelled": ("CANCELLED", "the provider batch was cancelled"),
    "failed": ("INVALID_ARGUMENT", "the provider refused the batch"),
    "completed": ("INTERNAL", "the provider returned no line for this request"),
}
# Request states in the store.
PENDING, ANSWERED, FAILED = "pending", "answered", "failed"
# Ledger states of an answered request.
UNRECORDED, COST_PENDING, RECORDED = 0, 1, 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    batch_id TEXT PRIMARY KEY, team TEXT NOT NULL, feature TEXT NOT NULL,
    created REAL NOT NULL, trace_id TEXT NOT NULL, span_id TEXT NOT NULL,
    total INTEGER NOT NULL, status TEXT NOT NULL, finished INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (finished);
CREATE TABLE IF NOT EXISTS parts (
    batch_id TEXT NOT NULL, part INTEGER NOT NULL, provider TEXT NOT NULL,
    model TEXT NOT NULL, provider_batch_id TEXT, input_file_id TEXT,
    status TEXT NOT NULL, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, part));
CREATE TABLE IF NOT EXISTS requests (
    batch_id TEXT NOT NULL, idx INTEGER NOT NULL, request_id TEXT NOT NULL,
    part INTEGER NOT NULL, route BLOB NOT NULL, prompt_estimate INTEGER NOT NULL,
    state TEXT NOT NULL, result BLOB, code TEXT, message TEXT, record BLOB,
    ledger INTEGER NOT NULL DEFAULT 0, cost_nano_usd INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, idx));
CREATE INDEX IF NOT EXISTS requests_by_part ON requests (batch_id, part);
"""
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    batch_id: str
    team: str
    feature: str
    created: float
    trace_id: str
    span_id: str
    total: int
    status: str
    finished: bool


@dataclass(frozen=True)
class Part:
    """One provider batch of a job: one model of one provider."""

    part: int
    provider: str
    model: str
    provider_batch_id: str | None
    status: str
    completed: int
    failed: int
    done: bool


@dataclass
class _Planned:
    """A validated, routed request on its way into a part's input file."""

    index: int
    request_id: str
    route: router_pb2.RouteResponse
    prompt_estimate: int
    line: bytes


@dataclass
class _PartPlan:
    provider: str
    model: str
    requests: list[_Planned] = field(default_factory=list)
    size: int = 0


@dataclass(frozen=True)
class _Outcome:
    """What a provider batch's files said about one request."""

    index: int
    result: inference_pb2.CompleteResponse | None = None
    record: ledger_pb2.UsageRecord | None = None
    code: str = ""
    message: str = ""


class JobStore:
    """The SQLite file behind ProviderBatches; methods are blocking and thread-safe."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def create(self, job: Job, plans: Sequence[_PartPlan]) -> None:
        """The job, its parts (not yet sent) and its requests, in one transaction."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (job.batch_id, job.team, job.feature, job.created, job.trace_id, job.span_id,
                 job.total, job.status),
            )  # fmt: skip
            for number, plan in enumerate(plans):
                db.execute(
                    "INSERT INTO parts (batch_id, part, provider, model, status)"
                    " VALUES (?, ?, ?, ?, 'submitting')",
                    (job.batch_id, number, plan.provider, plan.model),
                )
                db.executemany(
                    "INSERT INTO requests (batch_id, idx, request_id, part, route,"
                    " prompt_estimate, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (job.batch_id, r.index, r.request_id, number, r.route.SerializeToString(),
                         r.prompt_estimate, PENDING)
                        for r in plan.requests
                    ],
                )  # fmt: skip

    def delete(self, batch_id: str) -> None:
        with self._transaction() as db:
            for table in ("requests", "parts", "jobs"):
                db.execute(f"DELETE FROM {table} WHERE batch_id = ?", (batch_id,))  # noqa: S608

    def job(self, batch_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(
                "SELECT batch_id, team, feature, created, trace_id, span_id, total, status,"
                " finished FROM jobs WHERE batch_id = ?",
                (batch_id,),
            ).fetchone()
        if row is None:
            return None
        batch_id, team, feature, created, trace_id, span_id, total, status, finished = row
        return Job(batch_id, team, feature, created, trace_id, span_id, total, status,
                   bool(finished))  # fmt: skip

    def unfinished(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT batch_id FROM jobs WHERE finished = 0 ORDER BY created"
            ).fetchall()
        return [str(r[0]) for r in rows]

    def parts(self, batch_id: str) -> list[Part]:
        with self._lock:
            rows = self._db.execute(
                "SELECT part, provider, model, provider_batch_id, status, completed, failed,"
                " done FROM parts WHERE batch_id = ? ORDER BY part",
                (batch_id,),
            ).fetchall()
        return [
            Part(part, provider, model, provider_batch_id, status, completed, failed, bool(done))
            for part, provider, model, provider_batch_id, status, completed, failed, done in rows
        ]

    def sent(self, batch_id: str, part: int, provider_batch_id: str, input_file_id: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE parts SET provider_batch_id = ?, input_file_id = ?, status = 'validating'"
                " WHERE batch_id = ? AND part = ?",
                (provider_batch_id, input_file_id, batch_id, part),
            )

    def progress(self, batch_id: str, part: int, status: str, completed: int, failed: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE parts SET status = ?, completed = ?, failed = ?"
                " WHERE batch_id = ? AND part = ? AND done = 0",
                (status, completed, failed, batch_id, part),
            )

    def custom_ids(self, batch_id: str, part: int) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, idx FROM requests WHERE batch_id = ? AND part = ?",
                (batch_id, part),
            ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def route_of(self, batch_id: str, part: int) -> dict[int, tuple[router_pb2.RouteResponse, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, route, prompt_estimate FROM requests WHERE batch_id = ? AND part = ?",
                (batch_id, part),
            ).fetchall()
        return {int(r[0]): (router_pb2.RouteResponse.FromString(r[1]), int(r[2])) for r in rows}

    def finish_part(
        self,
        batch_id: str,
        part: int,
        status: str,
        outcomes: Iterable[_Outcome],
        unanswered: tuple[str, str],
    ) -> None:
        """Store a finished provider batch's results and failures, all or nothing; a
        request the files did not mention fails with `unanswered` (code, message)."""
        with self._transaction() as db:
            for o in outcomes:
                if o.result is not None and o.record is not None:
                    db.execute(
                        "UPDATE requests SET state = ?, result = ?, record = ?"
                        " WHERE batch_id = ? AND idx = ? AND state = ?",
                        (ANSWERED, o.result.SerializeToString(), o.record.SerializeToString(),
                         batch_id, o.index, PENDING),
                    )  # fmt: skip
                else:
                    db.execute(
                        "UPDATE requests SET state = ?, code = ?, message = ?"
                        " WHERE batch_id = ? AND idx = ? AND state = ?",
                        (FAILED, o.code, o.message, batch_id, o.index, PENDING),
                    )
            db.execute(
                "UPDATE requests SET state = ?, code = ?, message = ?"
                " WHERE batch_id = ? AND part = ? AND state = ?",
                (FAILED, *unanswered, batch_id, part, PENDING),
            )
            counts = db.execute(
                "SELECT SUM(state = ?), SUM(state = ?) FROM requests"
                " WHERE batch_id = ? AND part = ?",
                (ANSWERED, FAILED, batch_id, part),
            ).fetchone()
            db.execute(
                "UPDATE parts SET status = ?, completed = ?, failed = ?, done = 1"
                " WHERE batch_id = ? AND part = ?",
                (status, counts[0] or 0, counts[1] or 0, batch_id, part),
            )

    def to_record(self, batch_id: str, ledger_states: Sequence[int]) -> list[tuple[int, bytes]]:
        marks = ",".join("?" * len(ledger_states))
        with self._lock:
            rows = self._db.execute(
                f"SELECT idx, record FROM requests WHERE batch_id = ? AND state = ?"  # noqa: S608
                f" AND ledger IN ({marks}) ORDER BY idx",
                (batch_id, ANSWERED, *ledger_states),
            ).fetchall()
        return [(int(r[0]), bytes(r[1])) for r in rows]

    def recorded(self, batch_id: str, index: int, cost_nano_usd: int | None) -> None:
        """The outbox holds the record; with its cost when the ledger answered."""
        with self._transaction() as db:
            if cost_nano_usd is None:
                db.execute(
                    "UPDATE requests SET ledger = ? WHERE batch_id = ? AND idx = ? AND ledger = ?",
                    (COST_PENDING, batch_id, index, UNRECORDED),
                )
            else:
                db.execute(
                    "UPDATE requests SET ledger = ?, cost_nano_usd = ?"
                    " WHERE batch_id = ? AND idx = ?",
                    (RECORDED, cost_nano_usd, batch_id, index),
                )

    def set_status(self, batch_id: str, status: str, finished: bool) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status = ?, finished = ? WHERE batch_id = ?",
                (status, int(finished), batch_id),
            )

    def outcomes(
        self, batch_id: str
    ) -> tuple[list[inference_pb2.CompleteResponse], list[inference_pb2.BatchFailure]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, state, result, code, message, ledger, cost_nano_usd"
                " FROM requests WHERE batch_id = ? AND state != ? ORDER BY idx",
                (batch_id, PENDING),
            ).fetchall()
        results, failures = [], []
        for request_id, state, blob, code, message, ledger, cost in rows:
            if state == ANSWERED:
                result = inference_pb2.CompleteResponse.FromString(blob)
                result.cost_nano_usd = cost
                result.cost_pending = ledger != RECORDED
                results.append(result)
            else:
                failures.append(
                    inference_pb2.BatchFailure(request_id=request_id, code=code, message=message)
                )
        return results, failures


class ProviderBatches:
    """Durable jobs on the provider's batch API; every result recorded exactly once."""

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

    async def start(self) -> None:
        """Resume polling the jobs still in flight."""
        self._poller = asyncio.create_task(self._poll_forever(), name="provider-batches")

    async def stop(self) -> None:
        """Stop polling; jobs stay on disk and resume at the next start."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._submitting:  # jobs being handed to providers: let them get there
            await asyncio.wait(
                set(self._submitting), timeout=self._settings.provider_timeout_seconds
            )
        self._store.close()

    # --- SubmitBatch -----------------------------------------------------------------

    async def submit(
        self, request: inference_pb2.SubmitBatchRequest, principal: Principal
    ) -> inference_pb2.SubmitBatchResponse:
        with self._tracer.start_as_current_span("batch.submit") as span:
            span.set_attributes(
                {
                    "costmesh.team": principal.team,
                    "costmesh.feature": request.feature,
                    "costmesh.batch.total": len(request.requests),
                    "costmesh.batch.mode": inference_pb2.BatchMode.Name(request.mode),
                }
            )
            requests = self._checked(request)
            routes = await self._route_all(requests)
            plans = self._plan(requests, routes)
            context = span.get_span_context()
            job = Job(
                batch_id=PREFIX + uuid.uuid4().hex,
                team=principal.team,
                feature=request.feature,
                created=time.time(),
                trace_id=trace.format_trace_id(context.trace_id) if context.is_valid else "",
                span_id=trace.format_span_id(context.span_id) if context.is_valid else "",
                total=len(requests),
                status="submitting",
                finished=False,
            )
            span.set_attributes(
                {"costmesh.batch_id": job.batch_id, "costmesh.batch.parts": len(plans)}
            )
            # Once the job is on disk it goes through even if the caller gives up: a
            # provider batch may already exist, and its answers must be recorded.
            task = asyncio.ensure_future(self._start_job(job, plans, routes))
            self._submitting.add(task)
            task.add_done_callback(self._submitting.discard)
            task.add_done_callback(_retrieved)  # a caller that gave up never reads it
            status = await asyncio.shield(task)
            span.set_attribute("costmesh.batch.status", status)
            return inference_pb2.SubmitBatchResponse(batch_id=job.batch_id)

    async def _start_job(
        self, job: Job, plans: Sequence[_PartPlan], routes: Sequence[router_pb2.RouteResponse]
    ) -> str:
        """Store the job, then hand its parts to the providers; the job's status."""
        # Held until every part is sent, so the poller never mistakes a part being
        # sent for one a crash left behind.
        async with self._job_lock(job.batch_id):
            # Durable before any provider sees it: a crash from here on is resumed.
            await asyncio.to_thread(self._store.create, job, plans)
            await self._record_routing(job, routes)
            sent = await asyncio.gather(
                *(self._send(job, number, plan) for number, plan in enumerate(plans))
            )
            if not any(sent):
                await asyncio.to_thread(self._store.delete, job.batch_id)
                raise Unavailable(
                    "the provider batch API is unavailable; nothing was submitted",
                    reason="PROVIDER_UNAVAILABLE",
                )
            status, _, _ = await self._settle(job)
            return status

    def _checked(
        self, batch: inference_pb2.SubmitBatchRequest
    ) -> list[tuple[inference_pb2.CompleteRequest, int]]:
        """Each request with the batch's feature filled in and its max_tokens."""
        return [(c.request, c.max_tokens) for c in check_batch(batch, self._settings, RULES)]

    async def _route_all(
        self, requests: Sequence[tuple[inference_pb2.CompleteRequest, int]]
    ) -> list[router_pb2.RouteResponse]:
        """The router's plan for every request, a few at a time."""
        gate = asyncio.Semaphore(ROUTE_CONCURRENCY)

        async def route(i: int, request: inference_pb2.CompleteRequest) -> router_pb2.RouteResponse:
            message = router_pb2.RouteRequest(
                feature=request.feature, messages=request.messages, requested_model=request.model
            )
            async with gate:
                try:
                    return await self._peers.router.Route(
                        message, metadata=self._peers.metadata, timeout=self._peers.timeout
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        raise InvalidArgument(
                            f"requests[{i}]", exc.details() or "refused by the router"
                        ) from exc
                    raise Unavailable(
                        f"router unavailable ({exc.code().name})", reason="ROUTER_UNAVAILABLE"
                    ) from exc

        return await _gather_all(route(i, r) for i, (r, _) in enumerate(requests))

    def _plan(
        self,
        requests: Sequence[tuple[inference_pb2.CompleteRequest, int]],
        routes: Sequence[router_pb2.RouteResponse],
    ) -> list[_PartPlan]:
        """The JSONL lines, grouped by (provider, model), cut to the size limit."""
        open_parts: dict[tuple[str, str], _PartPlan] = {}
        plans: list[_PartPlan] = []
        for i, ((request, max_tokens), route) in enumerate(zip(requests, routes, strict=True)):
            model = route.model
            info = self._settings.models.get(model)
            if info is None:
                raise Unavailable(f"the router chose unknown model {model!r}")
            prompt = estimate_tokens(request.messages)
            with _naming(f"requests[{i}]"):
                check_context_window(prompt, max_tokens, model, info.context_window)
            line = (json.dumps(_line(request, model, max_tokens)) + "\n").encode()
            key = (info.provider, model)
            plan = open_parts.get(key)
            if plan is None or plan.size + len(line) > MAX_FILE_BYTES:
                plan = open_parts[key] = _PartPlan(info.provider, model)
                plans.append(plan)
            plan.requests.append(_Planned(i, request.request_id, route, prompt, line))
            plan.size += len(line)
        return plans

    async def _send(self, job: Job, number: int, plan: _PartPlan) -> bool:
        """Upload one part's file and create its provider batch, retrying what may pass
        (settings.retry); False when it failed (its requests then fail)."""
        client = self._client(plan.provider)
        data = b"".join(r.line for r in plan.requests)
        policy = self._settings.retry
        uploaded: str | None = None
        for attempt in range(1, policy.max_attempts + 1):
            try:
                if uploaded is None:
                    name = f"{job.batch_id}-{number}.jsonl"
                    file = await client.files.create(
                        file=(name, data, "application/jsonl"), purpose="batch"
                    )
                    uploaded = file.id
                created = await client.batches.create(
                    input_file_id=uploaded,
                    endpoint=ENDPOINT,
                    completion_window=COMPLETION_WINDOW,
                    metadata={METADATA_KEY: job.batch_id, PART_KEY: str(number)},
                )
            except openai.OpenAIError as exc:
                log.warning("provider batch of %s (part %d) not created (try %d): %r",
                            job.batch_id, number, attempt, exc)  # fmt: skip
                # A create whose answer was lost may have made the batch all the same.
                if uploaded is not None and await self._adopt(job, number, plan.provider):
                    return True
                if attempt == policy.max_attempts or not retryable(exc):
                    reason = f"the provider batch could not be created: {_brief(exc)}"
                    await asyncio.to_thread(
                        self._store.finish_part, job.batch_id, number, "failed", (),
                        ("UNAVAILABLE", reason),
                    )  # fmt: skip
                    return False
                await asyncio.sleep(policy.delay(attempt, retry_after(exc), self._rng))
                continue
            await asyncio.to_thread(self._store.sent, job.batch_id, number, created.id, uploaded)
            return True
        return False

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

    async def _record_routing(self, job: Job, routes: Sequence[router_pb2.RouteResponse]) -> None:
        """A billed classification (the llm router) is paid now, at the normal price."""
        for i, route in enumerate(routes):
            usage = route.classifier_usage
            if not (usage.input_tokens or usage.output_tokens):
                continue
            info = self._settings.models.get(route.classifier_model)
            record = self._record(job, f"{job.batch_id}:{i}:routing", route, usage)
            record.model, record.provider = route.classifier_model, info.provider if info else ""
            # Overhead, not batched: normal price, and nothing in the counterfactual.
            record.purpose, record.batch = ledger_pb2.CALL_PURPOSE_ROUTING, False
            record.latency_ms = 0
            record.baseline_usage.CopyFrom(types_pb2.TokenUsage())
            await self._outbox.deliver(record, self._peers.timeout)

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

    # --- GetBatch --------------------------------------------------------------------

    async def get(self, batch_id: str, principal: Principal) -> inference_pb2.GetBatchResponse:
        job = await asyncio.to_thread(self._store.job, batch_id)
        # Another team's batch does not exist, as far as the caller can tell.
        if job is None or (job.team != principal.team and principal.role != "admin"):
            raise NotFound(f"batch_id: no batch {batch_id!r}")
        status, completed, failed = await self._refresh(batch_id)
        results, failures = await asyncio.to_thread(self._store.outcomes, batch_id)
        return inference_pb2.GetBatchResponse(
            batch_id=batch_id,
            status=status,
            total=job.total,
            completed=completed,
            failed=failed,
            results=results,
            mode=MODE,
            failures=failures,
        )

    # --- polling -------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            try:
                unfinished = await asyncio.to_thread(self._store.unfinished)
            except Exception:  # the store itself failed: try again next round
                log.exception("listing unfinished provider batches failed")
                unfinished = []
            for batch_id in unfinished:
                try:
                    await self._refresh(batch_id)
                except Exception:  # one broken job must not stop the others
                    log.exception("polling batch %s failed", batch_id)
            await asyncio.sleep(self._settings.batch_poll_seconds)

    async def _refresh(self, batch_id: str) -> tuple[str, int, int]:
        """Bring a job up to date with its providers and the ledger, once; its status
        and counts. A provider or ledger failure leaves it for the next round."""
        async with self._job_lock(batch_id):
            job = await asyncio.to_thread(self._store.job, batch_id)
            if job is None:
                raise NotFound(f"batch_id: no batch {batch_id!r}")
            links = []
            if job.trace_id and job.span_id:
                submitted = SpanContext(
                    int(job.trace_id, 16), int(job.span_id, 16), is_remote=True,
                    trace_flags=TraceFlags(TraceFlags.SAMPLED),
                )  # fmt: skip
                links.append(Link(submitted))
            with self._tracer.start_as_current_span("batch.poll", links=links) as span:
                span.set_attributes({"costmesh.batch_id": batch_id, "costmesh.team": job.team})
                if not job.finished:
                    for part in await asyncio.to_thread(self._store.parts, batch_id):
                        try:
                            await self._poll_part(job, part)
                        except Exception as exc:  # the others still go ahead
                            log.exception("polling part %d of %s failed", part.part, batch_id)
                            span.add_event("batch.part_failed", {"error.type": type(exc).__name__})
                status, completed, failed = await self._settle(job)
                span.set_attributes(
                    {
                        "costmesh.batch.status": status,
                        "costmesh.batch.total": job.total,
                        "costmesh.batch.completed": completed,
                        "costmesh.batch.failed": failed,
                    }
                )
                return status, completed, failed

    async def _poll_part(self, job: Job, part: Part) -> None:
        if part.done:
            return
        if part.provider_batch_id is None:
            # Left by a submit that did not finish (a crash): created, or never.
            if not await self._adopt(job, part.part, part.provider):
                await asyncio.to_thread(
                    self._store.finish_part, job.batch_id, part.part, "failed", (),
                    ("UNAVAILABLE", "the submission was interrupted before the provider took it"),
                )  # fmt: skip
            return
        client = self._client(part.provider)
        try:
            batch = await client.batches.retrieve(part.provider_batch_id)
            counts = batch.request_counts
            await asyncio.to_thread(
                self._store.progress, job.batch_id, part.part, batch.status,
                counts.completed if counts else 0, counts.failed if counts else 0,
            )  # fmt: skip
            if batch.status not in TERMINAL:
                return
            outcomes = await self._read_files(job, part, batch)
        except openai.OpenAIError as exc:
            log.warning("provider batch %s of %s: %r; will retry", part.provider_batch_id,
                        job.batch_id, exc)  # fmt: skip
            trace.get_current_span().add_event("batch.provider_failed", {"error.type": _brief(exc)})
            return
        unanswered = _UNANSWERED.get(batch.status, _UNANSWERED["failed"])
        if batch.status == "failed" and batch.errors and batch.errors.data:
            first = batch.errors.data[0]
            unanswered = ("INVALID_ARGUMENT", f"the provider refused the batch: {first.message}")
        await asyncio.to_thread(
            self._store.finish_part, job.batch_id, part.part, batch.status, outcomes, unanswered
        )
        await self._delete_files(client, batch)

    async def _read_files(self, job: Job, part: Part, batch: Any) -> list[_Outcome]:
        """Every line of a finished provider batch's output and error files."""
        client = self._client(part.provider)
        label = self._label(part.provider)
        ids = await asyncio.to_thread(self._store.custom_ids, job.batch_id, part.part)
        routes = await asyncio.to_thread(self._store.route_of, job.batch_id, part.part)
        outcomes = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            text = (await client.files.content(file_id)).text
            for raw in text.splitlines():
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                    index = ids[line["custom_id"]]
                    route, prompt = routes[index]
                    outcome = self._outcome(
                        job, index, line, model=part.model, label=label, route=route,
                        prompt_estimate=prompt,
                    )  # fmt: skip
                except (ValueError, KeyError, TypeError, AttributeError, IndexError):
                    # Its request is then failed as one the provider gave no line for.
                    log.warning("provider batch %s: unreadable line %.200r", batch.id, raw)
                    continue
                outcomes.append(outcome)
        return outcomes

    def _outcome(
        self,
        job: Job,
        index: int,
        line: dict[str, Any],
        *,
        model: str,
        label: str,
        route: router_pb2.RouteResponse,
        prompt_estimate: int,
    ) -> _Outcome:
        """A result (with its ledger record) or a failure, from one output/error line."""
        custom_id = str(line["custom_id"])
        response, error = line.get("response") or {}, line.get("error")
        body = response.get("body") if isinstance(response, dict) else None
        status = response.get("status_code") if isinstance(response, dict) else None
        if status != 200 or not isinstance(body, dict) or not body.get("choices"):
            return _Outcome(index, code=_failure_code(status, error), message=_message(body, error))
        choice = body["choices"][0]
        content = (choice.get("message") or {}).get("content") or ""
        usage = body.get("usage")
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details") or {}
            tokens = types_pb2.TokenUsage(
                input_tokens=int(usage.get("prompt_tokens") or 0),
                cached_input_tokens=int(details.get("cached_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
            )
        else:  # billed on an estimate rather than for free, as Complete does
            log.warning("provider batch line %s reported no usage; billing an estimate", custom_id)
            tokens = types_pb2.TokenUsage(
                input_tokens=prompt_estimate, output_tokens=math.ceil(len(content) / 4)
            )
        # The catalog name asked for, not the provider's dated snapshot: the ledger prices it.
        result = inference_pb2.CompleteResponse(
            request_id=custom_id,
            content=content,
            model=model,
            provider=label,
            cache_outcome=types_pb2.CACHE_OUTCOME_BYPASS,
            usage=tokens,
            trace_id=job.trace_id,
            tier=route.tier,
            finish_reason=choice.get("finish_reason") or "",
            route_reason=route.reason,
            attempts=1,
        )
        record = self._record(job, f"{job.batch_id}:{index}", route, tokens)
        record.model, record.provider, record.client_request_id = model, label, custom_id
        return _Outcome(index, result=result, record=record)

    async def _delete_files(self, client: openai.AsyncOpenAI, batch: Any) -> None:
        """The provider keeps files until deleted; results are in the job store now."""
        for file_id in (batch.input_file_id, batch.output_file_id, batch.error_file_id):
            if file_id:
                try:
                    await client.files.delete(file_id)
                except openai.OpenAIError as exc:
                    log.info("could not delete provider file %s: %r", file_id, exc)

    async def _settle(self, job: Job) -> tuple[str, int, int]:
        """Hand every stored result to the ledger, then save the job's status: finished
        once every part is done and every result is in the outbox."""
        batch_id = job.batch_id
        await self._deliver(batch_id, await asyncio.to_thread(
            self._store.to_record, batch_id, (UNRECORDED, COST_PENDING)
        ))  # fmt: skip
        parts = await asyncio.to_thread(self._store.parts, batch_id)
        unrecorded = await asyncio.to_thread(self._store.to_record, batch_id, (UNRECORDED,))
        status = _status(parts)
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

        await _gather_all(deliver(index, blob) for index, blob in pending)

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


def _status(parts: Sequence[Part]) -> str:
    """The provider's status while any part runs (the least advanced one); once every
    part is done, `completed`, unless all ended the same other way (failed, expired)."""
    running = [p.status for p in parts if not p.done]
    if running:
        return min(running, key=lambda s: PROGRESS.index(s) if s in PROGRESS else len(PROGRESS))
    ended = {p.status for p in parts}
    return ended.pop() if len(ended) == 1 else "completed"


def _line(request: inference_pb2.CompleteRequest, model: str, max_tokens: int) -> dict[str, Any]:
    """One input line of the Batch API: the chat request Complete would send."""
    params = request.params
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": _ROLES[m.role], "content": m.content} for m in request.messages],
        "max_tokens": max_tokens,
    }
    if params.HasField("temperature"):
        body["temperature"] = params.temperature
    if params.HasField("top_p"):
        body["top_p"] = params.top_p
    if params.stop:
        body["stop"] = list(params.stop)
    response_format = openai_response_format(params.response_format)
    if response_format is not None:
        body["response_format"] = response_format
    return {"custom_id": request.request_id, "method": "POST", "url": ENDPOINT, "body": body}


def _failure_code(status: object, error: object) -> str:
    if isinstance(status, int):
        if status in _HTTP_CODES:
            return _HTTP_CODES[status]
        return "UNAVAILABLE" if status >= 500 else "UNKNOWN"
    code = error.get("code") if isinstance(error, dict) else None
    return "DEADLINE_EXCEEDED" if code == "batch_expired" else "UNKNOWN"


def _message(body: object, error: object) -> str:
    for source in (body.get("error") if isinstance(body, dict) else None, error):
        if isinstance(source, dict) and source.get("message"):
            return str(source["message"])
    return "the provider answered this request with an error"


@contextlib.contextmanager
def _naming(where: str) -> Iterator[None]:
    """An InvalidArgument about a request names it: `messages` becomes
    `requests[3].messages`."""
    try:
        yield
    except InvalidArgument as exc:
        field_name, description = exc.field_violations[0]
        raise InvalidArgument(f"{where}.{field_name}", description) from exc


async def _gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Run them all; on the first failure the others are cancelled and it is raised."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _retrieved(task: asyncio.Future[str]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("batch submission failed: %r", task.exception())


def _brief(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__} {status}" if status else type(exc).__name__
