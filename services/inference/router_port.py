"""The router as the request path uses it: the plan for a call, or the baseline
policy's for an experiment's control arm. The stub may reach the router over gRPC or
in this process: the contract is the messages."""

from __future__ import annotations

import grpc

from costmesh.cache.v1 import cache_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh.router.v1 import router_pb2, router_pb2_grpc
from services.common.errors import DeadlineExceeded, Unavailable
from services.inference.call import Call, overhead
from services.inference.settings import InferenceSettings


class RouterPort:
    """Plans a call; a classifier's own provider call becomes the call's overhead."""

    def __init__(
        self,
        stub: router_pb2_grpc.RouterServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        timeout: float,
        settings: InferenceSettings,
    ) -> None:
        self._stub, self._metadata, self._timeout = stub, metadata, timeout
        self._settings = settings

    async def plan(
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
            plan = await self._stub.Route(
                route, metadata=self._metadata, timeout=deadline.cap(self._timeout)
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
                overhead(
                    self._settings,
                    plan.classifier_model,
                    plan.classifier_usage,
                    ledger_pb2.CALL_PURPOSE_ROUTING,
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
