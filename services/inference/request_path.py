"""The request path of DESIGN.md, for one CompleteRequest:

    validate -> arm -> look up -> hit
                               -> miss: single-flight(route -> admit -> answer -> store)
                      -> record

Each step is its own module: `call` (validate, arm), `cache_port` and `router_port`
(the peers, over gRPC or in process), `single_flight`, `admission` (team budgets),
`answering` (provider, escalation), `usage_recording` (ledger rows via the outbox).
Unary and streaming calls share the steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from opentelemetry import trace

from costmesh.cache.v1 import cache_pb2
from costmesh.inference.v1 import inference_pb2
from costmesh.types.v1 import types_pb2
from services.common.auth import Principal
from services.common.errors import DeadlineExceeded, InvalidArgument
from services.common.telemetry import current_trace_id
from services.inference.admission import Admission
from services.inference.answering import Answering, fill
from services.inference.cache_port import CachePort
from services.inference.call import (
    CACHEABLE_FINISH_REASONS,
    Call,
    cache_key,
    key_digest,
    new_call,
    new_response,
)
from services.inference.idempotency import IdempotencyStore
from services.inference.outbox_file import AlsoWrite
from services.inference.router_port import RouterPort
from services.inference.settings import InferenceSettings
from services.inference.single_flight import SingleFlight
from services.inference.usage_recording import Remember, UsageRecorder
from services.inference.validation import validate

Response = inference_pb2.CompleteResponse


class CompletionPath:
    """Answers one CompleteRequest. The cache fails open: its errors cost a miss."""

    def __init__(
        self,
        settings: InferenceSettings,
        *,
        cache: CachePort,
        router: RouterPort,
        admission: Admission,
        answering: Answering,
        recorder: UsageRecorder,
        idempotency: IdempotencyStore,
        peer_timeout: float,
    ) -> None:
        self._settings = settings
        self._cache, self._router = cache, router
        self._admission, self._answering, self._recorder = admission, answering, recorder
        self._idempotency = idempotency
        # A waiter gives the leader a route, a provider call and an escalation's.
        self._single_flight = SingleFlight(2 * settings.provider_timeout_seconds + peer_timeout)

    async def complete(
        self,
        request: inference_pb2.CompleteRequest,
        principal: Principal,
        time_remaining: float | None,
    ) -> Response:
        # A caller that names a request_id can retry and collect the answer, so it is
        # finished even past the caller's deadline; without one nobody could ever
        # read it, and the caller's deadline bounds the work.
        call = new_call(
            request, principal, self._settings, None if request.request_id else time_remaining
        )
        if not request.request_id:
            return await self._answer(call)

        def remember(response: Response) -> AlsoWrite:
            return self._idempotency.remembered(principal.team, request, response)

        response = await self._idempotency.answer_once(
            principal.team, request, lambda: self._answer(call, remember)
        )
        trace.get_current_span().set_attribute(
            "costmesh.replayed", response.trace_id != current_trace_id()
        )
        return response

    async def _answer(self, call: Call, remember: Remember | None = None) -> Response:
        response = new_response(call)
        try:
            looked_up = await self._look_up(call)
            try:
                if looked_up is not None and looked_up.HasField("entry"):
                    baseline = _serve_hit(response, looked_up)
                else:
                    baseline = await self._generate_once(call, response, looked_up)
            except BaseException:
                # What was paid for on the way (a classification, an attempt, an
                # embedding) is recorded even though the call failed.
                await asyncio.shield(self._recorder.record_overhead(call, response, looked_up))
                raise
            _trace_outcome(response)
            # Shielded: once the work is done its usage is recorded, even if the caller
            # gives up (deadline, cancel) while the ledger write is under way.
            await asyncio.shield(
                self._recorder.record(call, response, baseline, looked_up, remember)
            )
            return response
        finally:
            self._admission.settle(call)

    async def stream(
        self,
        request: inference_pb2.CompleteRequest,
        principal: Principal,
        time_remaining: float | None,
    ) -> AsyncIterator[inference_pb2.StreamCompleteResponse]:
        """The answer as the provider writes it, then a summary with its cost.

        A cache hit comes as one delta. The ledger row and the cache entry are written
        once the stream is complete; a caller that cancels stops the provider call and
        is billed for what was produced. Streams are not escalated (text already sent
        cannot be replaced) and are not replayed by request_id.
        """
        call = new_call(request, principal, self._settings, time_remaining)
        response = new_response(call)
        looked_up = await self._look_up(call)
        baseline = types_pb2.TokenUsage()
        try:
            if looked_up is not None and looked_up.HasField("entry"):
                baseline = _serve_hit(response, looked_up)
                yield inference_pb2.StreamCompleteResponse(delta=response.content)
            else:
                async for delta in self._generate_stream(call, response, looked_up):
                    yield inference_pb2.StreamCompleteResponse(delta=delta)
                baseline.CopyFrom(response.usage)
        finally:
            # Cancelled or not, what was produced is recorded (shielded from the caller).
            await asyncio.shield(self._record_stream(call, response, baseline, looked_up))
        summary = Response()
        summary.CopyFrom(response)
        summary.content = ""
        yield inference_pb2.StreamCompleteResponse(summary=summary)

    async def report_wrong_hit(
        self, report: inference_pb2.ReportWrongHitRequest, principal: Principal
    ) -> inference_pb2.ReportWrongHitResponse:
        """A caller's report that a cached answer was wrong, passed to the cache under
        the key the request was looked up with (the caller's team, never another's)."""
        if not report.cache_entry_id:
            raise InvalidArgument("cache_entry_id", "required: the reply's cache_entry_id")
        validate(report.request, self._settings)
        trace.get_current_span().set_attributes(
            {
                "costmesh.feature": report.request.feature,
                "costmesh.team": principal.team,
                "costmesh.cache.entry_id": report.cache_entry_id,
            }
        )
        found = await self._cache.report_wrong_hit(
            cache_key(report.request, principal.team), report.cache_entry_id
        )
        return inference_pb2.ReportWrongHitResponse(
            similarity=found.similarity, partition_threshold=found.partition_threshold
        )

    async def settled(self) -> None:
        """Every row recorded so far has been offered to the ledger."""
        await self._recorder.settled()

    async def drain(self) -> None:
        """Let in-flight cache stores finish before shutdown."""
        await self._cache.drain()

    def _caching(self, call: Call) -> bool:
        """The control arm runs the baseline policy: no cache."""
        feature = self._settings.features[call.request.feature]
        return feature.cache_mode != "off" and not call.assignment.control

    async def _look_up(self, call: Call) -> cache_pb2.LookupResponse | None:
        """None when the call skips the cache or the cache failed (it fails open)."""
        control = call.request.cache_control
        if not self._caching(call) or control.no_cache:
            return None
        return await self._cache.lookup(call.key, control, call.deadline)

    async def _generate_once(
        self, call: Call, response: Response, looked_up: cache_pb2.LookupResponse | None
    ) -> types_pb2.TokenUsage:
        """Generate, unless an identical request is already generating: then share its
        answer (served as an exact hit). Returns what the answer cost the provider
        call that made it."""
        embedded = looked_up if looked_up is not None else cache_pb2.LookupResponse()
        caching = self._caching(call)

        async def generate() -> Response:
            return await self._generate(call, response, embedded, caching=caching)

        if not caching or call.request.cache_control.no_cache:
            return (await generate()).usage
        first, shared = await self._single_flight.answer(
            key_digest(call.key), call.deadline, generate
        )
        if shared:
            _serve_collapsed(response, first)
        return first.usage

    async def _generate(
        self, call: Call, response: Response, looked_up: cache_pb2.LookupResponse, *, caching: bool
    ) -> Response:
        """Route, admit, answer, store."""
        control = call.request.cache_control
        plan = await self._admission.admit(call, await self._router.plan(call, looked_up), response)
        completion = await self._answering.answer(call, plan, response)
        fill(response, plan, completion, control.no_cache or not caching)
        finished = completion.finish_reason in CACHEABLE_FINISH_REASONS
        if caching and not control.no_store and completion.content and finished:
            self._cache.store_later(call, call.key, completion, looked_up)
        return response

    async def _generate_stream(
        self, call: Call, response: Response, looked_up: cache_pb2.LookupResponse | None
    ) -> AsyncIterator[str]:
        """Route, admit, stream, store."""
        embedded = looked_up if looked_up is not None else cache_pb2.LookupResponse()
        control, caching = call.request.cache_control, self._caching(call)
        plan = await self._admission.admit(call, await self._router.plan(call, embedded), response)
        # One bound for opening and streaming together.
        ends = time.monotonic() + call.deadline.cap(self._settings.provider_timeout_seconds)
        opened = await self._answering.open_stream(call, plan.model, ends - time.monotonic())
        finished = False
        try:
            # No asyncio.timeout around a yield (it would cancel whoever is consuming the
            # stream at that moment): the deadline is checked per delta, and a provider
            # that stalls is cut by the SDK's read timeout, set to the same bound.
            async for delta in opened.deltas():
                if time.monotonic() > ends:
                    raise DeadlineExceeded("the stream did not finish in time")
                yield delta
            finished = True
        finally:
            completion = await opened.close()
            fill(response, plan, completion, control.no_cache or not caching)
            trace.get_current_span().set_attribute("costmesh.stream.cancelled", not finished)
        stored = finished and completion.finish_reason in CACHEABLE_FINISH_REASONS
        if caching and stored and not control.no_store and completion.content:
            self._cache.store_later(call, call.key, completion, embedded)

    async def _record_stream(
        self,
        call: Call,
        response: Response,
        baseline: types_pb2.TokenUsage,
        looked_up: cache_pb2.LookupResponse | None,
    ) -> None:
        try:
            if response.model:  # an answer (or part of one) exists
                await self._recorder.record(call, response, baseline, looked_up)
            else:
                await self._recorder.record_overhead(call, response, looked_up)
        finally:
            self._admission.settle(call)


def _serve_hit(response: Response, looked_up: cache_pb2.LookupResponse) -> types_pb2.TokenUsage:
    """The reply from a cache entry; returns what the answer cost when generated."""
    entry = looked_up.entry
    response.content, response.model = entry.content, entry.model
    response.provider, response.finish_reason = "cache", entry.finish_reason
    response.cached, response.cache_outcome = True, looked_up.outcome
    response.cache_source_request_id = entry.source_request_id
    response.cache_entry_id = entry.entry_id
    return entry.usage


def _serve_collapsed(response: Response, first: Response) -> None:
    """The reply from an identical call's answer, generated while this one waited."""
    response.content, response.model = first.content, first.model
    response.provider, response.finish_reason = "cache", first.finish_reason
    response.cached, response.cache_outcome = True, types_pb2.CACHE_OUTCOME_EXACT
    response.cache_source_request_id = first.request_id
    trace.get_current_span().set_attribute("costmesh.cache.collapsed", True)


def _trace_outcome(response: Response) -> None:
    trace.get_current_span().set_attribute(
        "costmesh.cache.outcome", types_pb2.CacheOutcome.Name(response.cache_outcome)
    )
