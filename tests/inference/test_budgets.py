"""Team budgets: refusals, the downgrade policy, and no slipping past a limit together."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from services.common.config import load_config
from services.common.pricing import PriceCatalog
from services.inference.budgets import OverBudgetError, TeamBudgets, TeamLimits
from tests.clock import Clock
from tests.conftest import AUTH, Mesh, running_mesh, user_request

# gpt-4o-mini: 150 nano-USD an input token, 600 an output token; max_tokens 20 makes
# a worst case of about 12,000 + 20 * 600 + prompt ~= 16,000 nano-USD a call.
CONFIG = """
[teams.demo]
daily_usd = "0.00005"

[features.capped]
router = "rules"
cache_mode = "off"
max_tokens_default = 20

[features.big]
router = "rules"
tier = "complex"
cache_mode = "off"
max_tokens_default = 20

[features.thrifty]
router = "rules"
tier = "complex"
cache_mode = "off"
max_tokens_default = 20
over_budget = "downgrade"
"""
LIMIT_NANO = 50_000


@pytest.fixture
async def mesh(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(simulator, tmp_path, CONFIG) as running:
        yield running


async def spent(mesh: Mesh) -> int:
    spend = await mesh.ledger.QuerySpend(ledger_pb2.QuerySpendRequest(), metadata=AUTH, timeout=5)
    return spend.total_cost_nano_usd


async def test_a_team_over_its_daily_budget_is_refused_and_never_overspends(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    answered, refusal = 0, None
    for i in range(20):
        try:
            await mesh.inference.Complete(
                user_request(f"Question {i}", "capped"), metadata=AUTH, timeout=10
            )
            answered += 1
        except grpc.aio.AioRpcError as exc:
            refusal = exc
            break

    assert refusal is not None
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "daily budget" in (refusal.details() or "")
    assert answered >= 2
    assert await spent(mesh) <= LIMIT_NANO
    assert simulator.call_count == answered  # the refused call never reached the provider


async def test_concurrent_calls_cannot_slip_past_the_limit_together(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.set_latency(0.2)  # all of them in flight at once

    results = await asyncio.gather(
        *(
            mesh.inference.Complete(user_request(f"Q{i}", "capped"), metadata=AUTH, timeout=10)
            for i in range(12)
        ),
        return_exceptions=True,
    )

    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert refused
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert await spent(mesh) <= LIMIT_NANO
    assert simulator.call_count == len(results) - len(refused)


async def test_the_refuse_policy_refuses_what_the_large_model_would_cost(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.inference.Complete(user_request("Hi", "big"), metadata=AUTH, timeout=10)

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_downgrade_policy_sends_the_call_to_the_cheapest_tier(mesh: Mesh) -> None:
    reply = await mesh.inference.Complete(user_request("Hi", "thrifty"), metadata=AUTH, timeout=10)

    assert reply.downgraded
    assert reply.model == "gpt-4o-mini"  # gpt-4o's worst case does not fit; mini's does
    assert "over its daily budget -> gpt-4o-mini" in reply.route_reason
    front = next(
        s for s in mesh.spans.get_finished_spans()
        if s.name.endswith("InferenceService/Complete") and s.attributes
        and "costmesh.budget.decision" in s.attributes
    )  # fmt: skip
    assert front.attributes is not None
    assert front.attributes["costmesh.budget.decision"] == "downgraded"
    assert front.attributes["costmesh.budget.over"] == "daily"


async def test_a_team_without_limits_is_not_counted(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    config = CONFIG.replace("[teams.demo]", "[teams.someone_else]")
    async with running_mesh(simulator, tmp_path, config) as mesh:
        for i in range(10):  # about 5,700 nano-USD each
            await mesh.inference.Complete(
                user_request(f"Question {i}", "capped"), metadata=AUTH, timeout=10
            )
        assert await spent(mesh) > LIMIT_NANO


async def test_rows_waiting_in_the_outbox_keep_counting_after_the_ledger_is_read_again() -> None:
    """A ledger outage must not make a team's spend look smaller: rows still on their
    way to the ledger count until the ledger has them, then until its figure does."""
    clock = Clock()
    ledger_figure = 0

    async def spend_since(team: str, since: datetime) -> int:
        return ledger_figure

    prices = PriceCatalog.from_config(load_config().section("models"), "test")
    budgets = TeamBudgets(
        {"demo": TeamLimits(daily_nano=100, monthly_nano=None)}, prices, spend_since, clock
    )
    reservation = await budgets.admit("demo", 60)
    budgets.on_the_way("demo", "row-1", 40)  # priced, in the outbox, the ledger down
    budgets.settle(reservation)
    clock.now += 60  # the next admission reads the ledger again: it lacks row-1
    with pytest.raises(OverBudgetError):
        await budgets.admit("demo", 61)

    budgets.acknowledged("demo", "row-1", 40)  # delivered; the ledger's figure lags
    with pytest.raises(OverBudgetError):
        await budgets.admit("demo", 61)
    ledger_figure = 40
    clock.now += 60  # now the ledger's figure includes it: counted once, not twice
    assert await budgets.admit("demo", 60) is not None


async def test_the_control_arm_is_refused_rather_than_downgraded(mesh: Mesh) -> None:
    """A downgraded control call would not be the baseline policy it is compared to."""
    control = user_request("Hi", "thrifty", experiment="e", arm=types_pb2.ARM_CONTROL)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.inference.Complete(control, metadata=AUTH, timeout=10)
    treatment = user_request("Hi", "thrifty", experiment="e", arm=types_pb2.ARM_TREATMENT)
    reply = await mesh.inference.Complete(treatment, metadata=AUTH, timeout=10)

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reply.downgraded, "the treatment arm follows the feature's policy"
