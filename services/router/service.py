"""RouterService servicer: proto <-> domain translation around the feature plans."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry import trace

from costmesh.router.v1 import router_pb2, router_pb2_grpc
from costmesh.types.v1 import types_pb2
from services.common.auth import current_principal
from services.common.config import Config
from services.common.errors import InvalidArgument
from services.common.server import ServiceDef
from services.router.plans import FeaturePlan, load_plans

SERVICE_NAME = "costmesh.router.v1.RouterService"
TIER_TO_PROTO = {
    "simple": types_pb2.TIER_SIMPLE,
    "moderate": types_pb2.TIER_MODERATE,
    "complex": types_pb2.TIER_COMPLEX,
}


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, plans: dict[str, FeaturePlan]) -> None:
        self._plans = plans

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> router_pb2.RouteResponse:
        current_principal()
        plan = self._plans.get(request.feature)
        if plan is None:
            raise InvalidArgument("feature", f"unknown feature {request.feature!r}")
        decision = plan.decide(request.feature, request.requested_model)
        trace.get_current_span().set_attributes(
            {
                "costmesh.feature": request.feature,
                "costmesh.route.tier": decision.tier,
                "costmesh.route.model": decision.model,
                "costmesh.route.reason": decision.reason,
            }
        )
        return router_pb2.RouteResponse(
            tier=TIER_TO_PROTO[decision.tier],
            model=decision.model,
            escalation_model=decision.escalation_model,
            confidence=decision.confidence,
            reason=decision.reason,
            probabilities=[
                router_pb2.TierProbability(
                    tier=TIER_TO_PROTO[decision.tier], probability=decision.confidence
                )
            ],
        )


def build(config: Config) -> ServiceDef:
    """The router service with the plans of every configured feature."""
    plans = load_plans(config.section("features"), set(config.section("models").names()))
    servicer = RouterServicer(plans)
    return ServiceDef(
        SERVICE_NAME,
        lambda server: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server),
    )
