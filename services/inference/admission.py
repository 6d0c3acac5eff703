"""Admission against team budgets, from reservation to settlement in one owner: a
call reserves its worst case before each provider call it makes, and releases it
once its rows are priced (they then count on their own)."""

from __future__ import annotations

from opentelemetry import trace

from costmesh.inference.v1 import inference_pb2
from costmesh.router.v1 import router_pb2
from services.common.errors import ResourceExhausted
from services.inference.budgets import OverBudgetError, TeamBudgets
from services.inference.call import Call
from services.inference.escalation import RATING_TOKENS
from services.inference.settings import InferenceSettings
from services.inference.validation import estimate_tokens


class Admission:
    def __init__(self, settings: InferenceSettings, budgets: TeamBudgets) -> None:
        self._settings = settings
        self._budgets = budgets

    async def admit(
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
            await self.reserve(call, plan.model, strict=True)
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
                await self.reserve(call, cheap, strict=True)
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

    async def reserve(self, call: Call, model: str, *, strict: bool = False) -> bool:
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

    def settle(self, call: Call) -> None:
        """Release the call's worst cases: its priced rows count on their own by now."""
        for reservation in call.reservations:
            self._budgets.settle(reservation)
        call.reservations.clear()

    def on_the_way(self, team: str, request_id: str, cost: int) -> None:
        """A priced row is on disk, on its way to the ledger: it counts until then."""
        self._budgets.on_the_way(team, request_id, cost)
