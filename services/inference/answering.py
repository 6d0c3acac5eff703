"""Getting the answer from a provider: the planned model's, or the escalation
model's when the first answer is not confident enough; streamed or whole."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence

from opentelemetry import trace

from costmesh.inference.v1 import inference_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh.router.v1 import router_pb2
from costmesh.types.v1 import types_pb2
from services.common.errors import ServiceError
from services.inference.admission import Admission
from services.inference.call import Call, Overhead, usage_of
from services.inference.escalation import (
    RATING_TOKENS,
    EscalationThresholds,
    ask_for_rating,
    logprob_confidence,
    strip_rating,
)
from services.inference.settings import InferenceSettings
from services.inference.validation import (
    check_context_window,
    estimate_tokens,
    openai_response_format,
)
from services.providers.client import ChatCall, ChatStream, Completion, Providers

log = logging.getLogger(__name__)


class Answering:
    def __init__(
        self, settings: InferenceSettings, providers: Providers, admission: Admission
    ) -> None:
        self._settings = settings
        self._providers = providers
        self._admission = admission
        self._escalation = EscalationThresholds()
        self._random = random.Random()  # tie-breaks at the escalation bar

    async def answer(
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
        if confidence is None and not _unrated_means_unsure(call, method, first):
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
        if not await self._admission.reserve(call, plan.escalation_model):
            span.add_event("escalation skipped: the team is over budget")
            span.set_attribute("costmesh.escalated", False)
            return first
        attempt = Overhead(
            first.model, first.provider, usage_of(first), ledger_pb2.CALL_PURPOSE_ESCALATED_ATTEMPT
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

    async def open_stream(self, call: Call, model: str, time_limit: float) -> ChatStream:
        """The planned model's answer as it is written (streams are not escalated)."""
        messages = call.request.messages
        window = self._settings.models[model].context_window
        check_context_window(estimate_tokens(messages, model), call.max_tokens, model, window)
        return await self._providers.open_stream(
            _chat_call(call, model, messages, call.max_tokens, logprobs=False), time_limit
        )

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
            _chat_call(call, model, messages, max_tokens, logprobs=logprobs),
            call.deadline.cap(self._settings.provider_timeout_seconds),
        )


def fill(
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
    response.usage.CopyFrom(usage_of(completion))
    response.attempts, response.fallback = completion.attempts, completion.fallback
    trace.get_current_span().set_attributes(
        {"costmesh.attempts": completion.attempts, "costmesh.fallback": completion.fallback}
    )


def _unrated_means_unsure(
    call: Call, method: router_pb2.EscalationMethod.ValueType, first: Completion
) -> bool:
    """A self-rating the model could have written and did not is a sign of trouble.
    Not so when the answer was cut (length, or the caller's stop sequences), or when
    the provider returns no log-probabilities at all: then the answer is unjudged."""
    if method != router_pb2.ESCALATION_METHOD_SELF_RATING:
        return False
    return first.finish_reason == "stop" and not call.request.params.stop


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
        seed=params.seed if params.HasField("seed") else None,
    )
