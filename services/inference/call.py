"""One validated CompleteRequest and what the request path learns about it on the way."""

from __future__ import annotations

import functools
import hashlib
import time
import uuid
from dataclasses import dataclass, field

from opentelemetry import trace

from costmesh.cache.v1 import cache_pb2
from costmesh.inference.v1 import inference_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh.router.v1 import router_pb2
from costmesh.types.v1 import types_pb2
from services.common.auth import Principal
from services.common.telemetry import current_trace_id
from services.inference import experiments
from services.inference.budgets import Reservation
from services.inference.peers import Deadline
from services.inference.settings import InferenceSettings
from services.inference.validation import validate
from services.providers.client import Completion

# Only answers the provider finished are stored (the cache refuses others too).
CACHEABLE_FINISH_REASONS = ("stop", "length")


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

    @functools.cached_property
    def key(self) -> cache_pb2.CacheKey:
        """What the cache knows this call by (built once)."""
        return cache_key(self.request, self.principal.team)


def new_call(
    request: inference_pb2.CompleteRequest,
    principal: Principal,
    settings: InferenceSettings,
    time_remaining: float | None,
) -> Call:
    """Validate the request (InvalidArgument names the field), assign its experiment
    arm, and put who and what on the span."""
    started = time.monotonic()
    limits, max_tokens = validate(request, settings)
    usage_id = uuid.uuid4().hex
    call = Call(
        request=request,
        request_id=request.request_id or usage_id,
        usage_id=usage_id,
        principal=principal,
        max_tokens=max_tokens,
        deadline=Deadline.after(time_remaining),
        started=started,
        assignment=experiments.assign(request, limits.experiment, request.request_id or usage_id),
    )
    span = trace.get_current_span()
    span.set_attributes(
        {
            "costmesh.request_id": call.request_id,
            "costmesh.feature": request.feature,
            "costmesh.team": principal.team,
        }
    )
    if call.assignment.experiment:
        span.set_attributes(
            {
                "costmesh.experiment": call.assignment.experiment,
                "costmesh.arm": experiments.arm_name(call.assignment.arm),
            }
        )
    return call


def new_response(call: Call) -> inference_pb2.CompleteResponse:
    return inference_pb2.CompleteResponse(
        request_id=call.request_id,
        trace_id=current_trace_id(),
        experiment=call.assignment.experiment,
        arm=call.assignment.arm,
    )


def usage_of(completion: Completion) -> types_pb2.TokenUsage:
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


def key_digest(key: cache_pb2.CacheKey) -> str:
    return hashlib.sha256(key.SerializeToString(deterministic=True)).hexdigest()


def overhead(
    settings: InferenceSettings,
    model: str,
    usage: types_pb2.TokenUsage,
    purpose: ledger_pb2.CallPurpose.ValueType,
) -> Overhead:
    """A billed call around the answer, under its model's configured provider."""
    info = settings.models.get(model)
    return Overhead(model, info.provider if info else "", usage, purpose)
