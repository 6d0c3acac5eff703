"""SubmitBatch: check, route, plan parts, store the job, hand the parts to providers."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence

import grpc
import openai
from opentelemetry import trace

from costmesh.inference.v1 import inference_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh.router.v1 import router_pb2
from costmesh.types.v1 import types_pb2
from services.common.auth import Principal
from services.common.errors import InvalidArgument, Unavailable
from services.inference.batch_requests import check_batch
from services.inference.batches.core import (
    JobsCore,
)
from services.inference.batches.jobs import (
    COMPLETION_WINDOW,
    ENDPOINT,
    MAX_FILE_BYTES,
    METADATA_KEY,
    PART_KEY,
    PREFIX,
    ROUTE_CONCURRENCY,
    RULES,
    Job,
    PartPlan,
    Planned,
)
from services.inference.batches.lines import (
    batch_line,
    brief,
    gather_all,
    naming,
    retrieved,
)
from services.inference.validation import (
    check_context_window,
    estimate_tokens,
)
from services.providers.failures import retry_after, retryable

log = logging.getLogger(__name__)


class Submitting(JobsCore):
    """Checks a batch, routes it, and hands its parts to the providers."""

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
            task.add_done_callback(retrieved)  # a caller that gave up never reads it
            status = await asyncio.shield(task)
            span.set_attribute("costmesh.batch.status", status)
            return inference_pb2.SubmitBatchResponse(batch_id=job.batch_id)

    async def _start_job(
        self, job: Job, plans: Sequence[PartPlan], routes: Sequence[router_pb2.RouteResponse]
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

        return await gather_all(route(i, r) for i, (r, _) in enumerate(requests))

    def _plan(
        self,
        requests: Sequence[tuple[inference_pb2.CompleteRequest, int]],
        routes: Sequence[router_pb2.RouteResponse],
    ) -> list[PartPlan]:
        """The JSONL lines, grouped by (provider, model), cut to the size limit."""
        open_parts: dict[tuple[str, str], PartPlan] = {}
        plans: list[PartPlan] = []
        for i, ((request, max_tokens), route) in enumerate(zip(requests, routes, strict=True)):
            model = route.model
            info = self._settings.models.get(model)
            if info is None:
                raise Unavailable(f"the router chose unknown model {model!r}")
            prompt = estimate_tokens(request.messages)
            with naming(f"requests[{i}]"):
                check_context_window(prompt, max_tokens, model, info.context_window)
            line = (json.dumps(batch_line(request, model, max_tokens)) + "\n").encode()
            key = (info.provider, model)
            plan = open_parts.get(key)
            if plan is None or plan.size + len(line) > MAX_FILE_BYTES:
                plan = open_parts[key] = PartPlan(info.provider, model)
                plans.append(plan)
            plan.requests.append(Planned(i, request.request_id, route, prompt, line))
            plan.size += len(line)
        return plans

    async def _send(self, job: Job, number: int, plan: PartPlan) -> bool:
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
                    reason = f"the provider batch could not be created: {brief(exc)}"
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
