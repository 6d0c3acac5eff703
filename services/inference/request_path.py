"""The request path of DESIGN.md: cache lookup, route, provider, store, ledger."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import trace

from costmesh.cache.v1 import cache_pb2
from costmesh.inference.v1 import inference_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh.router.v1 import router_pb2
from costmesh.types.v1 import types_pb2
from services.common.auth import Principal
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.common.outages import OutageLog
from services.common.pricing import PriceCatalog, Usage
from services.common.telemetry import current_trace_id
from services.inference import experiments
from services.inference.budgets import OverBudgetError, Reservation, TeamBudgets
from services.inference.escalation import (
    RATING_TOKENS,
    EscalationThresholds,
    ask_for_rating,
    logprob_confidence,
    strip_rating,
)
from services.inference.idempotency import IdempotencyStore
from services.inference.outbox import UsageOutbox
from services.inference.peers import Deadline, Peers
from services.inference.settings import InferenceSettings
from services.inference.validation import (
    check_context_window,
    estimate_tokens,
    openai_response_format,
    validate,
)
from services.providers.client import ChatCall, Completion, Providers

log = logging.getLogger(__name__)
# Only answers the provider finished are stored (the cache refuses others too).
CACHEABLE_FINISH_REASONS = ("stop", "length")
# The ledger keeps a route reason of at most this many characters; a longer one (an
# intent name from someone's training data) is cut rather than lose the row.
MAX_ROUTE_REASON = 1000


@dataclass(frozen=True)
class Overhead:
    """A billed call made around the answer: its own ledger row, with nothing in the
    counterfactual (without cache and routing it would not have happened)."""

    model: str
    provider: str
    usage: types_pb2.TokenUsage
    purpose: ledger_pb2.CallPurpose.ValueType


@dataclass(frozen=True)
class Call:
    """One validated CompleteRequest and what the path needs to know about it."""

    request: inference_pb2.CompleteRequest
    request_id: str  # the caller's, or usage_id when the caller chose none
    usage_id: str  # this answer's own ledger id: a call made again gets a new one
    principal: Principal
    max_tokens: int
    deadline: Deadline
    started: float
    # Filled in as the call goes: the router's plan and the overhead to record.
    route: router_pb2.RouteResponse = field(default_factory=router_pb2.RouteResponse)
    overhead: list[Overhead] = field(default_factory=list)
    reservations: list[Reservation] = field(default_factory=list)
    assignment: experiments.Assignment = experiments.NONE


class CompletionPath:
    """Answers one CompleteRequest. The cache fails open: its errors cost a miss."""

    def __init__(
        self,
        settings: InferenceSettings,
        peers: Peers,
        providers: Providers,
        outbox: UsageOutbox,
        idempotency: IdempotencyStore,
        *,
        budgets: TeamBudgets,
        prices: PriceCatalog,
    ) -> None:
        self._settings = settings
        self._budgets = budgets
        self._prices = prices
        self._peers = peers
        self._providers = providers
        self._outbox = outbox
        self._idempotency = idempotency
        self._cache_outage = OutageLog(log, "cache lookups (served as misses)")
        self._store_outage = OutageLog(log, "cache stores")
        # Stores still in flight, by cache key: an identical request waits for the
        # store instead of paying the provider again.
        self._pending_stores: dict[str, asyncio.Task[None]] = {}
        # Misses being generated, by cache key: identical ones wait for the first.
        self._in_flight: dict[str, asyncio.Future[inference_pb2.CompleteResponse]] = {}
        self._escalation = EscalationThresholds()
        self._random = random.Random()  # tie-breaks at the escalation bar

    async def complete(
        self,
        request: inference_pb2.CompleteRequest,
        principal: Principal,
        time_remaining: float | None,
    ) -> inference_pb2.CompleteResponse:
        # A caller that names a request_id can retry and collect the answer, so it is
        # finished even past the caller's deadline; without one nobody could ever
        # read it, and the caller's deadline bounds the work.
        call = self._new_call(request, principal, None if request.request_id else time_remaining)
        span = trace.get_current_span()
        if not request.request_id:
            return await self._answer_within_budget(call)
        response = await self._idempotency.answer_once(
            principal.team, request, lambda: self._answer_within_budget(call)
        )
        span.set_attribute("costmesh.replayed", response.trace_id != current_trace_id())
        return response

    def _new_call(
        self,
        request: inference_pb2.CompleteRequest,
        principal: Principal,
        time_remaining: float | None,
    ) -> Call:
        started = time.monotonic()
        limits, max_tokens = validate(request, self._settings)
        usage_id = uuid.uuid4().hex
        request_id = request.request_id or usage_id
        call = Call(
            request=request,
            request_id=request_id,
            usage_id=usage_id,
            principal=principal,
            max_tokens=max_tokens,
            deadline=Deadline.after(time_remaining),
            started=started,
            assignment=experiments.assign(
                request, limits.experiment, request.request_id or usage_id
            ),
        )
        trace.get_current_span().set_attributes(
            {
                "costmesh.request_id": call.request_id,
                "costmesh.feature": request.feature,
                "costmesh.team": principal.team,
            }
        )
        if call.assignment.experiment:
            trace.get_current_span().set_attributes(
                {
                    "costmesh.experiment": call.assignment.experiment,
                    "costmesh.arm": experiments.arm_name(call.assignment.arm),
                }
            )
        return call

    @staticmethod
    def _new_response(call: Call) -> inference_pb2.CompleteResponse:
        return inference_pb2.CompleteResponse(
            request_id=call.request_id,
            trace_id=current_trace_id(),
            experiment=call.assignment.experiment,
            arm=call.assignment.arm,
        )

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
        call = self._new_call(request, principal, time_remaining)
        response = self._new_response(call)
        key, caching = self._cache_key(call), self._caching(call)
        looked_up = None
        if caching and not request.cache_control.no_cache:
            looked_up = await self._lookup(key, request.cache_control, call.deadline)
        baseline_usage = types_pb2.TokenUsage()
        try:
            if looked_up is not None and looked_up.HasField("entry"):
                self._serve_hit(response, looked_up, baseline_usage)
                yield inference_pb2.StreamCompleteResponse(delta=response.content)
            else:
                embedding = looked_up if looked_up is not None else cache_pb2.LookupResponse()
                async for delta in self._generate_stream(call, key, response, embedding, caching):
                    yield inference_pb2.StreamCompleteResponse(delta=delta)
                baseline_usage.CopyFrom(response.usage)
        finally:
            # Cancelled or not, what was produced is recorded (shielded from the caller).
            await asyncio.shield(self._record_stream(call, response, baseline_usage, looked_up))
        summary = inference_pb2.CompleteResponse()
        summary.CopyFrom(response)
        summary.content = ""
        yield inference_pb2.StreamCompleteResponse(summary=summary)

    async def _record_stream(
        self,
        call: Call,
        response: inference_pb2.CompleteResponse,
        baseline_usage: types_pb2.TokenUsage,
        looked_up: cache_pb2.LookupResponse | None,
    ) -> None:
        try:
            if response.model:  # an answer (or part of one) exists
                await self._record_all(call, response, baseline_usage, looked_up)
            else:
                await self._record_overhead_all(call, response, looked_up)
        finally:
            self._settle(call)

    async def _generate_stream(
        self,
        call: Call,
        key: cache_pb2.CacheKey,
        response: inference_pb2.CompleteResponse,
        looked_up: cache_pb2.LookupResponse,
        caching: bool,
    ) -> AsyncIterator[str]:
        request = call.request
        plan = await self._admit(call, await self._route(call, looked_up), response)
        model = plan.model
        window = self._settings.models[model].context_window
        check_context_window(
            estimate_tokens(request.messages, model), call.max_tokens, model, window
        )
        # One bound for opening and streaming together.
        ends = time.monotonic() + call.deadline.cap(self._settings.provider_timeout_seconds)
        opened = await self._providers.open_stream(
            self._chat_call(call, model, request.messages, call.max_tokens, logprobs=False),
            ends - time.monotonic(),
        )
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
            self._fill(response, plan, completion, request.cache_control.no_cache or not caching)
            trace.get_current_span().set_attribute("costmesh.stream.cancelled", not finished)
        stored = finished and completion.finish_reason in CACHEABLE_FINISH_REASONS
        if caching and stored and not request.cache_control.no_store and completion.content:
            self._store_later(call, key, completion, request.cache_control, looked_up)

    async def _answer_within_budget(self, call: Call) -> inference_pb2.CompleteResponse:
        """The answer; the team's reservations are released once its rows are priced."""
        try:
            return await self._answer(call)
        finally:
            self._settle(call)

    def _settle(self, call: Call) -> None:
        """Release the call's worst cases: its priced rows count on their own by now."""
        for reservation in call.reservations:
            self._budgets.settle(reservation)
        call.reservations.clear()

    def _cache_key(self, call: Call) -> cache_pb2.CacheKey:
        return cache_key(call.request, call.principal.team)

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
        try:
            found = await self._peers.cache.ReportWrongHit(
                cache_pb2.ReportWrongHitRequest(
                    key=cache_key(report.request, principal.team),
                    entry_id=report.cache_entry_id,
                ),
                metadata=self._peers.metadata,
                timeout=self._peers.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or exc.code().name
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(details) from exc
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument("request", details) from exc
            raise Unavailable(f"cache unavailable: {details}") from exc
        return inference_pb2.ReportWrongHitResponse(
            similarity=found.similarity, partition_threshold=found.partition_threshold
        )

    def _caching(self, call: Call) -> bool:
        """The control arm runs the baseline policy: no cache."""
        feature = self._settings.features[call.request.feature]
        return feature.cache_mode != "off" and not call.assignment.control

    @staticmethod
    def _serve_hit(
        response: inference_pb2.CompleteResponse,
        looked_up: cache_pb2.LookupResponse,
        baseline_usage: types_pb2.TokenUsage,
    ) -> None:
        entry = looked_up.entry
        baseline_usage.CopyFrom(entry.usage)  # what the answer cost when generated
        response.content, response.model = entry.content, entry.model
        response.provider, response.finish_reason = "cache", entry.finish_reason
        response.cached, response.cache_outcome = True, looked_up.outcome
        response.cache_source_request_id = entry.source_request_id
        response.cache_entry_id = entry.entry_id

    async def _answer(self, call: Call) -> inference_pb2.CompleteResponse:
        control = call.request.cache_control
        key, caching = self._cache_key(call), self._caching(call)
        response = self._new_response(call)
        looked_up = None
        if caching and not control.no_cache:
            looked_up = await self._lookup(key, control, call.deadline)
        baseline_usage = types_pb2.TokenUsage()
        if looked_up is not None and looked_up.HasField("entry"):
            self._serve_hit(response, looked_up, baseline_usage)
        else:
            embedding = looked_up if looked_up is not None else cache_pb2.LookupResponse()
            try:
                baseline_usage.CopyFrom(
                    await self._generate_once(call, key, response, embedding, caching)
                )
            except BaseException:
                # Whatever was paid for on the way (a classification, an attempt, an
                # embedding) is recorded even though the call failed.
                await asyncio.shield(self._record_overhead_all(call, response, looked_up))
                raise
        trace.get_current_span().set_attributes(
            {"costmesh.cache.outcome": types_pb2.CacheOutcome.Name(response.cache_outcome)}
        )
        # Shielded: once the work is done its usage is recorded, even if the caller
        # gives up (deadline, cancel) while the ledger write is under way.
        await asyncio.shield(self._record_all(call, response, baseline_usage, looked_up))
        return response

    async def _record_all(
        self,
        call: Call,
        response: inference_pb2.CompleteResponse,
        baseline_usage: types_pb2.TokenUsage,
        looked_up: cache_pb2.LookupResponse | None,
    ) -> None:
        """The answer's row, then its overhead's, as one shielded unit."""
        await self._record(call, response, baseline_usage)
        await self._record_overhead_all(call, response, looked_up)

    async def _record_overhead_all(
        self,
        call: Call,
        response: inference_pb2.CompleteResponse,
        looked_up: cache_pb2.LookupResponse | None,
    ) -> None:
        if looked_up is not None and looked_up.embedding_usage.input_tokens:
            call.overhead.append(
                self._overhead(
                    looked_up.embedding_model,
                    looked_up.embedding_usage,
                    ledger_pb2.CALL_PURPOSE_CACHE_EMBEDDING,
                )
            )
        for overhead in call.overhead:
            await self._record_overhead(call, overhead, response)
        call.overhead.clear()

    async def _generate_once(
        self,
        call: Call,
        key: cache_pb2.CacheKey,
        response: inference_pb2.CompleteResponse,
        looked_up: cache_pb2.LookupResponse,
        caching: bool,
    ) -> types_pb2.TokenUsage:
        """Generate, unless an identical request is already generating: then share it.

        Concurrent identical misses would each pay the provider for the same answer;
        the first one calls it and the others wait for its answer (served as an
        exact hit). When the first call fails or is cancelled, the next waiter takes
        its place. Returns what the answer cost the provider call that made it.
        """
        if not caching or call.request.cache_control.no_cache:
            await self._generate(call, key, response, looked_up, caching)
            return response.usage
        digest = _key_digest(key)
        first = await self._first_answer(digest, call.deadline)
        if first is not None:
            response.content, response.model = first.content, first.model
            response.provider, response.finish_reason = "cache", first.finish_reason
            response.cached, response.cache_outcome = True, types_pb2.CACHE_OUTCOME_EXACT
            response.cache_source_request_id = first.request_id
            trace.get_current_span().set_attribute("costmesh.cache.collapsed", True)
            return first.usage
        if digest in self._in_flight:  # a leader too slow to wait for: go alone
            await self._generate(call, key, response, looked_up, caching)
            return response.usage
        future: asyncio.Future[inference_pb2.CompleteResponse] = (
            asyncio.get_running_loop().create_future()
        )
        self._in_flight[digest] = future
        try:
            await self._generate(call, key, response, looked_up, caching)
            future.set_result(response)
            return response.usage
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody may be waiting
            raise
        finally:
            if self._in_flight.get(digest) is future:
                del self._in_flight[digest]

    async def _first_answer(
        self, digest: str, deadline: Deadline
    ) -> inference_pb2.CompleteResponse | None:
        """The answer of an identical call in flight, once it is finished; None when
        there is none, it failed (and no other took its place), it is unfinished
        text, or it takes longer than this call may wait."""
        # Route, then a provider call and possibly an escalation's second one.
        wait = 2 * self._settings.provider_timeout_seconds + self._peers.timeout
        while (leader := self._in_flight.get(digest)) is not None:
            done, _ = await asyncio.wait({leader}, timeout=deadline.cap(wait))
            if leader not in done:
                return None
            if leader.exception() is None:
                first = leader.result()
                return first if first.finish_reason in CACHEABLE_FINISH_REASONS else None
            # The leader failed and has left the map: another caller may have taken
            # its place (then wait for that one), or this one becomes the leader.
        return None

    async def _generate(
        self,
        call: Call,
        key: cache_pb2.CacheKey,
        response: inference_pb2.CompleteResponse,
        looked_up: cache_pb2.LookupResponse,
        caching: bool,
    ) -> None:
        request = call.request
        plan = await self._admit(call, await self._route(call, looked_up), response)
        completion = await self._answer_with_escalation(call, plan, response)
        self._fill(response, plan, completion, request.cache_control.no_cache or not caching)
        finished = completion.finish_reason in CACHEABLE_FINISH_REASONS
        if caching and not request.cache_control.no_store and completion.content and finished:
            self._store_later(call, key, completion, request.cache_control, looked_up)

    @staticmethod
    def _fill(
        response: inference_pb2.CompleteResponse,
        plan: router_pb2.RouteResponse,
        completion: Completion,
        bypass: bool,
    ) -> None:
        """The reply's answer fields from a provider's completion."""
        response.content = completion.content
        response.model = completion.served_model or completion.model
        response.provider, response.finish_reason = completion.provider, completion.finish_reason
        response.tier, response.route_reason = plan.tier, plan.reason
        response.cache_outcome = (
            types_pb2.CACHE_OUTCOME_BYPASS if bypass else types_pb2.CACHE_OUTCOME_MISS
        )
        response.usage.CopyFrom(_usage(completion))
        response.attempts, response.fallback = completion.attempts, completion.fallback
        trace.get_current_span().set_attributes(
            {"costmesh.attempts": completion.attempts, "costmesh.fallback": completion.fallback}
        )

    async def _answer_with_escalation(
        self,
        call: Call,
        plan: router_pb2.RouteResponse,
        response: inference_pb2.CompleteResponse,
    ) -> Completion:
        """The planned model's answer, or the escalation model's when the first one is
        not confident enough. `model` of the result is the catalog name that answered."""
        feature, method = call.request.feature, plan.escalation_method
        bar = self._escalation.bar(
            feature, method, plan.escalation_threshold, plan.escalation_target_rate
        )
        wanted = bar.threshold > 0 or plan.escalation_target_rate > 0
        judged = bool(plan.escalation_model and method and wanted)
        first = await self._chat(call, plan.model, method if judged else None)
        rated = method == router_pb2.ESCALATION_METHOD_SELF_RATING
        content, confidence = strip_rating(first.content) if rated else (first.content, None)
        if method == router_pb2.ESCALATION_METHOD_LOGPROBS:
            confidence = logprob_confidence(first.token_logprobs)
        first = dataclasses.replace(first, content=content, model=first.served_model)
        if not judged:
            return first
        span = trace.get_current_span()
        span.set_attributes(
            {
                "costmesh.escalation.method": router_pb2.EscalationMethod.Name(method),
                "costmesh.escalation.threshold": bar.threshold,
            }
        )
        if confidence is None and not self._unrated_means_unsure(call, method, first):
            span.set_attribute("costmesh.escalation.unjudged", True)
            return first
        # An answer without a rating counts as the least confident one, also for the
        # target rate: otherwise the rate would overshoot by the unrated share.
        observed = 0.0 if confidence is None else confidence
        self._escalation.observe(feature, method, observed)
        if confidence is not None:
            response.confidence = confidence
            span.set_attribute("costmesh.escalation.confidence", confidence)
        escalate = bar.escalates(confidence, self._random.random())
        span.set_attribute("costmesh.escalated", escalate)
        if not escalate:
            return first
        if not await self._reserve(call, plan.escalation_model):
            span.add_event("escalation skipped: the team is over budget")
            span.set_attribute("costmesh.escalated", False)
            return first
        attempt = Overhead(
            first.model, first.provider, _usage(first), ledger_pb2.CALL_PURPOSE_ESCALATED_ATTEMPT
        )
        call.overhead.append(attempt)  # paid for: recorded even if what follows fails
        try:
            final = await self._chat(call, plan.escalation_model, None)
        except ServiceError as exc:
            # The first answer is unsure but usable: better than failing the call.
            call.overhead.remove(attempt)  # it is the answer after all
            log.warning("escalation to %s failed (%s); serving %s", plan.escalation_model,
                        exc.reason, first.model)  # fmt: skip
            span.add_event("escalation_failed", {"error.type": exc.reason})
            span.set_attribute("costmesh.escalated", False)
            return first
        if rated:  # asked or not, a rating tag never reaches the caller
            final = dataclasses.replace(final, content=strip_rating(final.content)[0])
        response.escalated, response.escalated_from = True, first.model
        span.set_attribute("costmesh.escalated_from", first.model)
        return dataclasses.replace(
            final, model=final.served_model, attempts=first.attempts + final.attempts
        )

    async def _admit(
        self,
        call: Call,
        plan: router_pb2.RouteResponse,
        response: inference_pb2.CompleteResponse,
    ) -> router_pb2.RouteResponse:
        """The plan if the team's budget holds its worst case; else, by the feature's
        policy, the cheapest tier's model (no escalation) or RESOURCE_EXHAUSTED. The
        control arm is never downgraded: it runs the baseline model or not at all."""
        team, span = call.principal.team, trace.get_current_span()
        if not self._budgets.limited(team):
            return plan
        try:
            await self._reserve(call, plan.model, strict=True)
        except OverBudgetError as exc:
            limits = self._settings.features[call.request.feature]
            cheap = limits.cheapest_model
            span.set_attribute("costmesh.budget.over", exc.period)
            if (
                limits.over_budget != "downgrade"
                or call.request.model
                or call.assignment.control
                or cheap == plan.model
            ):
                span.set_attribute("costmesh.budget.decision", "refused")
                raise ResourceExhausted(str(exc), reason="TEAM_BUDGET_EXCEEDED") from None
            try:
                await self._reserve(call, cheap, strict=True)
            except OverBudgetError as again:
                span.set_attribute("costmesh.budget.decision", "refused")
                raise ResourceExhausted(str(again), reason="TEAM_BUDGET_EXCEEDED") from None
            span.set_attribute("costmesh.budget.decision", "downgraded")
            response.downgraded = True
            downgraded = router_pb2.RouteResponse()
            downgraded.CopyFrom(plan)
            downgraded.model, downgraded.escalation_model = cheap, ""
            downgraded.escalation_method = router_pb2.ESCALATION_METHOD_UNSPECIFIED
            downgraded.reason = f"{plan.reason}; team over its {exc.period} budget -> {cheap}"
            call.route.CopyFrom(downgraded)
            return downgraded
        span.set_attribute("costmesh.budget.decision", "within")
        return plan

    async def _reserve(self, call: Call, model: str, *, strict: bool = False) -> bool:
        """Reserve the worst case of one call to `model`; False (or OverBudgetError when
        strict) when it does not fit."""
        if not self._budgets.limited(call.principal.team):
            return True
        # Whoever may answer: the model or one of its fallbacks, rating tag included.
        chain = [model, *self._settings.models[model].fallbacks]
        prompt = estimate_tokens(call.request.messages, model)
        worst = max(
            self._budgets.worst_case(m, prompt, call.max_tokens + RATING_TOKENS) for m in chain
        )
        try:
            reservation = await self._budgets.admit(call.principal.team, worst)
        except OverBudgetError:
            if strict:
                raise
            return False
        if reservation is not None:
            call.reservations.append(reservation)
        return True

    @staticmethod
    def _unrated_means_unsure(
        call: Call, method: router_pb2.EscalationMethod.ValueType, first: Completion
    ) -> bool:
        """A self-rating the model could have written and did not is a sign of trouble.
        Not so when the answer was cut (length, or the caller's stop sequences), or when
        the provider returns no log-probabilities at all: then the answer is unjudged."""
        if method != router_pb2.ESCALATION_METHOD_SELF_RATING:
            return False
        return first.finish_reason == "stop" and not call.request.params.stop

    async def _chat(
        self, call: Call, model: str, judged_by: router_pb2.EscalationMethod.ValueType | None
    ) -> Completion:
        """One provider call for this request; a judged one asks for its rating or logprobs."""
        messages: list[types_pb2.ChatMessage] = list(call.request.messages)
        max_tokens = call.max_tokens
        if judged_by == router_pb2.ESCALATION_METHOD_SELF_RATING:
            messages, max_tokens = ask_for_rating(messages), max_tokens + RATING_TOKENS
        window = self._settings.models[model].context_window
        check_context_window(estimate_tokens(messages, model), max_tokens, model, window)
        logprobs = judged_by == router_pb2.ESCALATION_METHOD_LOGPROBS
        return await self._providers.chat(
            self._chat_call(call, model, messages, max_tokens, logprobs=logprobs),
            call.deadline.cap(self._settings.provider_timeout_seconds),
        )

    @staticmethod
    def _chat_call(
        call: Call,
        model: str,
        messages: Sequence[types_pb2.ChatMessage],
        max_tokens: int,
        *,
        logprobs: bool,
    ) -> ChatCall:
        params = call.request.params
        return ChatCall(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=params.temperature if params.HasField("temperature") else None,
            top_p=params.top_p if params.HasField("top_p") else None,
            stop=list(params.stop),
            logprobs=logprobs,
            response_format=openai_response_format(params.response_format),
        )

    async def _lookup(
        self, key: cache_pb2.CacheKey, control: inference_pb2.CacheControl, deadline: Deadline
    ) -> cache_pb2.LookupResponse | None:
        """The cache's answer (a hit, or a miss carrying the question's embedding), or
        None when the cache failed: it fails open."""
        digest = _key_digest(key)
        pending = self._pending_stores.get(digest)
        if pending is not None:
            await asyncio.wait({pending}, timeout=deadline.cap(self._peers.timeout))
        lookup = cache_pb2.LookupRequest(key=key, max_age_seconds=control.max_age_seconds)
        if control.HasField("similarity_threshold"):
            lookup.similarity_threshold = control.similarity_threshold
        try:
            found = await self._peers.cache.Lookup(
                lookup, metadata=self._peers.metadata, timeout=deadline.cap(self._peers.timeout)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # The request itself is wrong for this feature (say, a per-tenant
                # cache without a scope_key): the caller must hear it.
                raise InvalidArgument("cache", exc.details() or "refused by the cache") from exc
            self._cache_outage.failed(exc.code().name)
            trace.get_current_span().add_event(
                "cache.lookup_failed", {"grpc.status": str(exc.code())}
            )
            return None
        self._cache_outage.succeeded()
        return found

    async def _route(
        self, call: Call, looked_up: cache_pb2.LookupResponse
    ) -> router_pb2.RouteResponse:
        """The router's plan. The cache's embedding of the question goes along, so the
        router need not embed it again (it is of the same text: the last user message)."""
        request, deadline = call.request, call.deadline
        if call.assignment.control:
            return self._baseline_plan(call)
        route = router_pb2.RouteRequest(
            feature=request.feature, messages=request.messages, requested_model=request.model
        )
        if self._settings.features[request.feature].cache_question == "last_user":
            route.embedding.extend(looked_up.query_embedding)
            route.embedding_model = looked_up.embedding_model
        try:
            plan = await self._peers.router.Route(
                route, metadata=self._peers.metadata, timeout=deadline.cap(self._peers.timeout)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline.passed():
                raise DeadlineExceeded("the call's deadline passed while routing") from exc
            raise Unavailable(
                f"router unavailable ({exc.code().name})", reason="ROUTER_UNAVAILABLE"
            ) from exc
        call.route.CopyFrom(plan)
        if plan.classifier_usage.input_tokens or plan.classifier_usage.output_tokens:
            call.overhead.append(
                self._overhead(
                    plan.classifier_model, plan.classifier_usage, ledger_pb2.CALL_PURPOSE_ROUTING
                )
            )
        return plan

    def _baseline_plan(self, call: Call) -> router_pb2.RouteResponse:
        """The control arm's plan: the feature's baseline model, no routing, no
        escalation (a model the caller names is still the caller's choice)."""
        model = call.request.model or self._settings.features[call.request.feature].baseline_model
        plan = router_pb2.RouteResponse(
            model=model,
            reason=f"control arm of experiment {call.assignment.experiment!r}: "
            f"the baseline policy ({model}, no cache, no routing)",
        )
        call.route.CopyFrom(plan)
        return plan

    def _store_later(
        self,
        call: Call,
        key: cache_pb2.CacheKey,
        completion: Completion,
        control: inference_pb2.CacheControl,
        looked_up: cache_pb2.LookupResponse,
    ) -> None:
        """Store off the response path; a failed store only costs a future miss."""
        digest = _key_digest(key)
        request = cache_pb2.StoreRequest(
            key=key,
            content=completion.content,
            # The catalog name, not the provider's dated snapshot name: the ledger
            # prices and groups hits under the model that was asked for.
            model=completion.model,
            usage=_usage(completion),
            finish_reason=completion.finish_reason,
            tags=control.tags,
            # The lookup already embedded the question: the cache need not again.
            query_embedding=looked_up.query_embedding,
            embedding_model=looked_up.embedding_model,
            # An invalidation while the answer was generated means it is not stored.
            namespace_version=looked_up.namespace_version,
            looked_up_at=looked_up.looked_up_at if looked_up.HasField("looked_up_at") else None,
            # Whose answer this is: a hit on it says so (false-hit measurement).
            source_request_id=call.request_id,
        )

        async def store() -> None:
            try:
                await self._peers.cache.Store(
                    request, metadata=self._peers.metadata, timeout=self._peers.timeout
                )
                self._store_outage.succeeded()
            except grpc.aio.AioRpcError as exc:
                self._store_outage.failed(exc.code().name)
            finally:
                self._pending_stores.pop(digest, None)

        self._pending_stores[digest] = asyncio.create_task(store())

    async def _record(
        self,
        call: Call,
        response: inference_pb2.CompleteResponse,
        baseline_usage: types_pb2.TokenUsage,
    ) -> None:
        """The answer's row, with the route decision behind it."""
        await self._deliver(
            call,
            response,
            request_id=call.usage_id,
            model=response.model,
            provider=response.provider,
            tier=response.tier,
            usage=response.usage,
            baseline_usage=baseline_usage,
            cache_outcome=response.cache_outcome,
            escalated=response.escalated,
            latency_ms=int((time.monotonic() - call.started) * 1000),
            purpose=ledger_pb2.CALL_PURPOSE_ANSWER,
            route_probabilities=[
                types_pb2.TierProbability(tier=p.tier, probability=min(max(p.probability, 0), 1))
                for p in call.route.probabilities
            ],
            route_reason=call.route.reason[:MAX_ROUTE_REASON],
            cache_source_request_id=response.cache_source_request_id,
        )

    async def _record_overhead(
        self, call: Call, overhead: Overhead, response: inference_pb2.CompleteResponse
    ) -> None:
        await self._deliver(
            call,
            response,
            request_id=uuid.uuid4().hex,
            model=overhead.model,
            provider=overhead.provider,
            tier=call.route.tier,
            usage=overhead.usage,
            baseline_usage=types_pb2.TokenUsage(),
            purpose=overhead.purpose,
        )

    async def _deliver(
        self, call: Call, response: inference_pb2.CompleteResponse, **fields: Any
    ) -> None:
        """One ledger row of this call, through the outbox; its cost adds to the reply's.

        The row is on disk before the reply leaves, so it cannot be lost, and the
        ledger gets it moments later in the background. The reply's cost is priced
        here with the same catalog the ledger uses; a model this process has no
        price for leaves the reply `cost_pending`.
        """
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        record = ledger_pb2.UsageRecord(
            client_request_id=call.request.request_id,
            trace_id=response.trace_id,
            time=now,
            team=call.principal.team,
            feature=call.request.feature,
            baseline_model=self._settings.features[call.request.feature].baseline_model,
            status=ledger_pb2.CALL_STATUS_OK,
            experiment=call.assignment.experiment,
            arm=call.assignment.arm,
            **fields,
        )
        cost = self._price(record)
        if cost is None:
            response.cost_pending = True
        else:
            response.cost_nano_usd += cost
        # Counted on the way only once on disk: a record the outbox could not keep
        # was sent directly (or lost), and never acknowledged later.
        if await self._outbox.enqueue(record, self._peers.timeout) and cost:
            self._budgets.on_the_way(record.team, record.request_id, cost)

    def _price(self, record: ledger_pb2.UsageRecord) -> int | None:
        """The row's cost as the ledger will price it; None for an unpriced model."""
        usage = Usage(
            record.usage.input_tokens, record.usage.cached_input_tokens, record.usage.output_tokens
        )
        if usage.input_tokens == usage.output_tokens == 0:
            return 0
        if not self._prices.knows(record.model):
            return None
        when = record.time.ToDatetime(tzinfo=UTC)
        return self._prices.cost(record.model, usage, when, batch=record.batch).cost_nano_usd

    async def settled(self) -> None:
        """Every row recorded so far has been offered to the ledger."""
        await self._outbox.settled()

    def _overhead(
        self, model: str, usage: types_pb2.TokenUsage, purpose: ledger_pb2.CallPurpose.ValueType
    ) -> Overhead:
        """A billed call around the answer, under its model's configured provider."""
        info = self._settings.models.get(model)
        return Overhead(model, info.provider if info else "", usage, purpose)

    async def drain(self) -> None:
        """Let in-flight cache stores finish before shutdown."""
        if self._pending_stores:
            await asyncio.wait(set(self._pending_stores.values()), timeout=self._peers.timeout)


def _usage(completion: Completion) -> types_pb2.TokenUsage:
    return types_pb2.TokenUsage(
        input_tokens=completion.input_tokens,
        cached_input_tokens=completion.cached_input_tokens,
        output_tokens=completion.output_tokens,
    )


def cache_key(request: inference_pb2.CompleteRequest, team: str) -> cache_pb2.CacheKey:
    """What the cache knows a request by: the caller's team and what it sent."""
    return cache_pb2.CacheKey(
        team=team,
        feature=request.feature,
        namespace=request.cache_control.namespace,
        scope_key=request.scope_key,
        model=request.model,
        messages=request.messages,
        params=request.params,
    )


def _key_digest(key: cache_pb2.CacheKey) -> str:
    return hashlib.sha256(key.SerializeToString(deterministic=True)).hexdigest()
