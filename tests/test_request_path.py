"""The user's walk through the mesh: complete, hit the cache, read the ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from opentelemetry.sdk.trace import TracerProvider

from costmesh.inference.v1 import inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator, count_tokens
from services import SERVICES
from services.common.config import load_config
from services.mesh import start_mesh
from tests.conftest import AUTH, Mesh, mesh_env, user_request

# Published prices of the seed models, in nano-USD per token.
MINI_INPUT, MINI_OUTPUT = 150, 600


async def test_complete_answers_with_model_usage_cost_and_trace(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    reply = await mesh.inference.Complete(
        user_request("What payment methods do you accept?"), metadata=AUTH, timeout=10
    )

    assert reply.content == "[simulated] Answer to: What payment methods do you accept?"
    assert reply.model == "gpt-4o-mini"
    assert reply.provider == "openai"
    assert not reply.cached
    assert reply.cache_outcome == types_pb2.CACHE_OUTCOME_MISS
    assert reply.usage.input_tokens == count_tokens("What payment methods do you accept?") + 4
    assert reply.usage.output_tokens == count_tokens(reply.content)
    expected = reply.usage.input_tokens * MINI_INPUT + reply.usage.output_tokens * MINI_OUTPUT
    assert reply.cost_nano_usd == expected
    assert len(reply.trace_id) == 32
    assert int(reply.trace_id, 16) != 0
    assert reply.tier in {types_pb2.TIER_SIMPLE, types_pb2.TIER_MODERATE}  # the small model's
    assert "gpt-4o-mini" in reply.route_reason
    assert simulator.call_count == 1


async def test_same_request_again_is_an_exact_hit_that_costs_nothing(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    first = await mesh.inference.Complete(
        user_request("Cancel my order"), metadata=AUTH, timeout=10
    )
    second = await mesh.inference.Complete(
        user_request("Cancel my order"), metadata=AUTH, timeout=10
    )

    assert second.cached
    assert second.cache_outcome == types_pb2.CACHE_OUTCOME_EXACT
    assert second.content == first.content
    assert second.model == first.model
    assert second.usage.input_tokens == second.usage.output_tokens == 0
    assert second.cost_nano_usd == 0
    assert simulator.call_count == 1


async def test_cache_is_partitioned_by_scope_and_parameters(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    await mesh.inference.Complete(
        user_request("Refund?", scope_key="tenant-a"), metadata=AUTH, timeout=10
    )
    other_tenant = await mesh.inference.Complete(
        user_request("Refund?", scope_key="tenant-b"), metadata=AUTH, timeout=10
    )
    other_params = user_request("Refund?", scope_key="tenant-a")
    other_params.params.temperature = 0.1
    changed = await mesh.inference.Complete(other_params, metadata=AUTH, timeout=10)

    assert not other_tenant.cached
    assert not changed.cached
    assert simulator.call_count == 3


async def test_no_cache_and_no_store_are_honoured(mesh: Mesh, simulator: OpenAISimulator) -> None:
    no_store = user_request("Track order 42")
    no_store.cache_control.no_store = True
    await mesh.inference.Complete(no_store, metadata=AUTH, timeout=10)
    stored = await mesh.inference.Complete(
        user_request("Track order 42"), metadata=AUTH, timeout=10
    )
    bypass = user_request("Track order 42")
    bypass.cache_control.no_cache = True
    bypassed = await mesh.inference.Complete(bypass, metadata=AUTH, timeout=10)

    assert not stored.cached
    assert bypassed.cache_outcome == types_pb2.CACHE_OUTCOME_BYPASS
    assert simulator.call_count == 3


async def test_query_spend_is_exactly_the_sum_of_call_costs(mesh: Mesh) -> None:
    questions = [
        "How do refunds work?",
        "Change my address",
        "How do refunds work?",
        "Close my account",
    ]
    costs_by_model: dict[str, int] = {}
    total = 0
    for question in questions:
        reply = await mesh.inference.Complete(user_request(question), metadata=AUTH, timeout=10)
        costs_by_model[reply.model] = costs_by_model.get(reply.model, 0) + reply.cost_nano_usd
        total += reply.cost_nano_usd
    explicit = user_request("Explain chargebacks in detail", model="gpt-4o")
    big = await mesh.inference.Complete(explicit, metadata=AUTH, timeout=10)
    costs_by_model["gpt-4o"] = big.cost_nano_usd
    total += big.cost_nano_usd

    for group, expected_keys in (
        (ledger_pb2.GROUP_BY_MODEL, set(costs_by_model)),
        (ledger_pb2.GROUP_BY_TEAM, {"demo"}),
        (ledger_pb2.GROUP_BY_FEATURE, {"support"}),
        (ledger_pb2.GROUP_BY_DAY, {datetime.now(UTC).strftime("%Y-%m-%d")}),
    ):
        spend = await mesh.ledger.QuerySpend(
            ledger_pb2.QuerySpendRequest(group_by=group), metadata=AUTH, timeout=5
        )
        assert {row.key for row in spend.rows} == expected_keys
        assert spend.total_cost_nano_usd == total
        assert sum(row.calls for row in spend.rows) == 5
    by_model = await mesh.ledger.QuerySpend(
        ledger_pb2.QuerySpendRequest(group_by=ledger_pb2.GROUP_BY_MODEL), metadata=AUTH, timeout=5
    )
    assert {row.key: row.cost_nano_usd for row in by_model.rows} == costs_by_model
    assert {row.key: row.cached_calls for row in by_model.rows} == {"gpt-4o-mini": 1, "gpt-4o": 0}


async def test_query_spend_time_range_excludes_calls_outside_it(mesh: Mesh) -> None:
    await mesh.inference.Complete(user_request("Opening hours?"), metadata=AUTH, timeout=10)
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))

    later = await mesh.ledger.QuerySpend(
        ledger_pb2.QuerySpendRequest(start_time=future), metadata=AUTH, timeout=5
    )
    everything = await mesh.ledger.QuerySpend(
        ledger_pb2.QuerySpendRequest(), metadata=AUTH, timeout=5
    )

    assert list(later.rows) == []
    assert everything.rows[0].calls == 1


async def test_a_retried_request_id_replays_the_first_answer_and_bills_once(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    request = user_request("Is my card blocked?", request_id="client-req-1")
    request.cache_control.no_cache = True
    first = await mesh.inference.Complete(request, metadata=AUTH, timeout=10)
    again = await mesh.inference.Complete(request, metadata=AUTH, timeout=10)

    spend = await mesh.ledger.QuerySpend(ledger_pb2.QuerySpendRequest(), metadata=AUTH, timeout=5)
    assert again == first, "the retry gets the first response, trace id included"
    assert first.request_id == "client-req-1"
    assert simulator.call_count == 1, "the provider is not paid twice"
    assert spend.rows[0].calls == 1
    assert spend.total_cost_nano_usd == first.cost_nano_usd


async def test_export_streams_every_recorded_call_with_its_cost_and_trace(mesh: Mesh) -> None:
    replies = [
        await mesh.inference.Complete(user_request(q), metadata=AUTH, timeout=10)
        for q in ("Card declined?", "Card declined?", "Lost card")
    ]

    exported = [
        item.record
        async for item in mesh.ledger.ExportUsage(
            ledger_pb2.ExportUsageRequest(), metadata=AUTH, timeout=5
        )
    ]

    assert [r.request_id for r in exported] == [r.request_id for r in replies]
    assert [r.cost_nano_usd for r in exported] == [r.cost_nano_usd for r in replies]
    assert [r.trace_id for r in exported] == [r.trace_id for r in replies]
    assert [r.cache_outcome for r in exported] == [
        types_pb2.CACHE_OUTCOME_MISS,
        types_pb2.CACHE_OUTCOME_EXACT,
        types_pb2.CACHE_OUTCOME_MISS,
    ]
    assert {r.team for r in exported} == {"demo"}
    assert [r.price_version for r in exported] == [
        f"2026-11-01:{replies[0].model}@1970-01-01",
        "2026-11-01:none",  # a hit uses no tokens: no price applies
        f"2026-11-01:{replies[2].model}@1970-01-01",
    ]
    assert [r.tier for r in exported] == [replies[0].tier, 0, replies[2].tier]
    assert [r.route_reason for r in exported] == [
        replies[0].route_reason,
        "",
        replies[2].route_reason,
    ]
    assert sum(p.probability for p in exported[0].route_probabilities) == pytest.approx(1.0)


async def test_the_mesh_serves_on_a_specific_listen_address(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    env = {**mesh_env(simulator, tmp_path), "COSTMESH_HOST": "127.0.0.2"}
    running = await start_mesh(load_config(env=env), env, SERVICES, TracerProvider(), port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.2:{running.port}") as channel:
            reply = await inference_pb2_grpc.InferenceServiceStub(channel).Complete(
                user_request("Bound elsewhere?"), metadata=AUTH, timeout=10
            )
    finally:
        await running.stop(grace=1)

    assert reply.content == "[simulated] Answer to: Bound elsewhere?"
    assert not reply.cost_pending


async def test_savings_against_the_baseline_model_are_a_query(mesh: Mesh) -> None:
    question = user_request("How do I check my invoice?")  # a simple ticket: the small model
    miss = await mesh.inference.Complete(question, metadata=AUTH, timeout=10)
    hit = await mesh.inference.Complete(question, metadata=AUTH, timeout=10)

    spend = await mesh.ledger.QuerySpend(
        ledger_pb2.QuerySpendRequest(group_by=ledger_pb2.GROUP_BY_TIER), metadata=AUTH, timeout=5
    )

    # The baseline (gpt-4o: 2,500 and 10,000 nano-USD a token) for both calls: the
    # miss with its own tokens, the hit with the tokens its answer first cost.
    on_baseline = miss.usage.input_tokens * 2500 + miss.usage.output_tokens * 10_000
    assert hit.cached
    assert spend.total_cost_nano_usd == miss.cost_nano_usd
    assert spend.total_counterfactual_cost_nano_usd == 2 * on_baseline
    assert spend.total_savings_nano_usd == 2 * on_baseline - miss.cost_nano_usd
    assert [(r.key, r.calls, r.savings_nano_usd) for r in spend.rows] == [
        ("simple", 1, on_baseline - miss.cost_nano_usd),
        ("unspecified", 1, on_baseline),  # a hit is not routed
    ]


async def test_spend_by_team_then_feature_is_the_chargeback_table(mesh: Mesh) -> None:
    for feature, question in (
        ("support", "Refund?"),
        ("default", "Summarise this"),
        ("support", "Hours?"),
    ):
        await mesh.inference.Complete(
            user_request(question, feature=feature), metadata=AUTH, timeout=10
        )

    table = await mesh.ledger.QuerySpend(
        ledger_pb2.QuerySpendRequest(
            group_by=ledger_pb2.GROUP_BY_TEAM, then_by=ledger_pb2.GROUP_BY_FEATURE
        ),
        metadata=AUTH,
        timeout=5,
    )
    with pytest.raises(grpc.aio.AioRpcError) as same:
        await mesh.ledger.QuerySpend(
            ledger_pb2.QuerySpendRequest(
                group_by=ledger_pb2.GROUP_BY_TEAM, then_by=ledger_pb2.GROUP_BY_TEAM
            ),
            metadata=AUTH,
            timeout=5,
        )

    assert [(r.key, r.second_key, r.calls) for r in table.rows] == [
        ("demo", "default", 1),
        ("demo", "support", 2),
    ]
    assert same.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (same.value.details() or "").startswith("then_by")
