"""Experiments in the ledger server, on SQLite and on PostgreSQL: each row keeps its
experiment, arm and cache source; spend and export filter by experiment and group by
arm, to the nano-dollar, and a member still sees only its own team."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.types.v1 import types_pb2
from tests.ledger.conftest import (
    MEMBER,
    NOON,
    SERVICE,
    export_all,
    record_all,
    stamp,
    usage_record,
)

Ledger = tuple["ledger_pb2_grpc.LedgerServiceAsyncStub", str]
# 1,000 input and 100 output tokens at USD 2.50 and 10.00 (gpt-4o), 0.15 and 0.60
# (gpt-4o-mini) per million, in nano-USD.
GPT_4O = 1000 * 2500 + 100 * 10_000
MINI = 1000 * 150 + 100 * 600
CONTROL, TREATMENT = types_pb2.ARM_CONTROL, types_pb2.ARM_TREATMENT
TOKENS = types_pb2.TokenUsage(input_tokens=1000, output_tokens=100)


def _trial(
    request_id: str, team: str, arm: int, day: int, **fields: object
) -> ledger_pb2.UsageRecord:
    when = NOON + timedelta(days=day, minutes=int(request_id[1:]))
    given = {"team": team, "experiment": "trial", "arm": arm, "time": stamp(when)}
    return usage_record(request_id, **{"baseline_model": "gpt-4o", **given, **fields})


ROWS = [
    _trial("c1", "support", CONTROL, 0, model="gpt-4o"),
    _trial("t1", "support", TREATMENT, 0),
    _trial("t3", "support", TREATMENT, 0, purpose=ledger_pb2.CALL_PURPOSE_ROUTING,
           baseline_model=""),  # overhead: its cost, no call, no savings claimed
    _trial("c2", "search", CONTROL, 1, model="gpt-4o"),
    _trial("t2", "search", TREATMENT, 1, usage=types_pb2.TokenUsage(), baseline_usage=TOKENS,
           cache_outcome=types_pb2.CACHE_OUTCOME_EXACT, cache_source_request_id="t1"),
    usage_record("o1", experiment="other", arm=TREATMENT),
    usage_record("n1"),  # in no experiment
]  # fmt: skip


async def _spend(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub,
    metadata: tuple[tuple[str, str]] = SERVICE,
    **fields: object,
) -> ledger_pb2.QuerySpendResponse:
    """Over three whole days, which the daily rollup answers when it can."""
    request = ledger_pb2.QuerySpendRequest(**fields)  # type: ignore[arg-type]
    midnight = NOON.replace(hour=0)
    request.start_time.FromDatetime(midnight)
    request.end_time.FromDatetime(midnight + timedelta(days=3))
    return await stub.QuerySpend(request, metadata=metadata, timeout=5)


def _sums(response: ledger_pb2.QuerySpendResponse) -> list[tuple[object, ...]]:
    return [
        (r.key, r.second_key, r.calls, r.cost_nano_usd, r.counterfactual_cost_nano_usd,
         r.cached_calls)
        for r in response.rows
    ]  # fmt: skip


async def test_spend_of_one_experiment_by_arm_is_exact(ledger_server: Ledger) -> None:
    stub, _ = ledger_server
    await record_all(stub, *ROWS)

    by_arm = await _spend(stub, experiment="trial", group_by=ledger_pb2.GROUP_BY_ARM)

    assert _sums(by_arm) == [
        ("control", "", 2, 2 * GPT_4O, 2 * GPT_4O, 0),
        ("treatment", "", 2, 2 * MINI, 2 * GPT_4O + MINI, 1),
    ]
    assert by_arm.total_cost_nano_usd == 2 * GPT_4O + 2 * MINI
    assert by_arm.total_savings_nano_usd == 2 * GPT_4O + MINI - 2 * MINI


async def test_arm_as_either_dimension_and_the_experiment_filter(ledger_server: Ledger) -> None:
    stub, _ = ledger_server
    await record_all(stub, *ROWS)

    every_arm = await _spend(stub, group_by=ledger_pb2.GROUP_BY_ARM)
    team_arm = await _spend(
        stub, experiment="trial", group_by=ledger_pb2.GROUP_BY_TEAM, then_by=ledger_pb2.GROUP_BY_ARM
    )
    by_day = await _spend(stub, experiment="trial", group_by=ledger_pb2.GROUP_BY_DAY)
    by_team = await _spend(stub, group_by=ledger_pb2.GROUP_BY_TEAM)  # the rollup, as before

    assert _sums(every_arm) == [
        ("control", "", 2, 2 * GPT_4O, 2 * GPT_4O, 0),
        ("treatment", "", 3, 3 * MINI, 2 * GPT_4O + 2 * MINI, 1),
        ("unspecified", "", 1, MINI, MINI, 0),
    ]
    assert _sums(team_arm) == [
        ("search", "control", 1, GPT_4O, GPT_4O, 0),
        ("search", "treatment", 1, 0, GPT_4O, 1),
        ("support", "control", 1, GPT_4O, GPT_4O, 0),
        ("support", "treatment", 1, 2 * MINI, GPT_4O + MINI, 0),
    ]
    assert [(r.key, r.cost_nano_usd) for r in by_day.rows] == [
        ("2025-11-26", GPT_4O + 2 * MINI),
        ("2025-11-27", GPT_4O),
    ]
    assert [(r.key, r.calls, r.cost_nano_usd) for r in by_team.rows] == [
        ("search", 2, GPT_4O),
        ("support", 4, GPT_4O + 4 * MINI),
    ]


async def test_export_of_one_experiment_keeps_arm_and_cache_source(ledger_server: Ledger) -> None:
    stub, _ = ledger_server
    await record_all(stub, *ROWS)

    trial = await export_all(stub, experiment="trial")

    assert [r.request_id for r in trial] == ["c1", "t1", "t3", "c2", "t2"], "in time order"
    hit = trial[-1]
    assert (hit.experiment, hit.arm, hit.cache_source_request_id) == ("trial", TREATMENT, "t1")
    assert [r.arm for r in trial] == [CONTROL, TREATMENT, TREATMENT, CONTROL, TREATMENT]
    everything = {r.request_id: r for r in await export_all(stub)}
    assert (everything["n1"].experiment, everything["n1"].arm) == ("", types_pb2.ARM_UNSPECIFIED)
    assert everything["n1"].cache_source_request_id == ""


async def test_a_member_sees_its_own_teams_arms_only(ledger_server: Ledger) -> None:
    stub, _ = ledger_server
    await record_all(stub, *ROWS)

    spend = await _spend(stub, MEMBER, experiment="trial", group_by=ledger_pb2.GROUP_BY_ARM)
    exported = await export_all(stub, MEMBER, experiment="trial")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _spend(stub, MEMBER, experiment="trial", team="support")

    assert _sums(spend) == [
        ("control", "", 1, GPT_4O, GPT_4O, 0),
        ("treatment", "", 1, 0, GPT_4O, 1),
    ]
    assert [r.request_id for r in exported] == ["c2", "t2"]
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_fields_of_exactly_their_limits_are_kept(ledger_server: Ledger) -> None:
    stub, _ = ledger_server
    experiment, source = "é" * 100, "s" * 128
    await record_all(
        stub, usage_record("r", experiment=experiment, arm=CONTROL, cache_source_request_id=source)
    )

    (record,) = await export_all(stub, experiment=experiment)
    assert (record.experiment, record.cache_source_request_id) == (experiment, source)


@pytest.mark.parametrize("experiment", ["", "trial"])
async def test_a_far_end_time_is_clamped_with_or_without_an_experiment(
    ledger_server: Ledger, experiment: str
) -> None:
    stub, _ = ledger_server
    await record_all(stub, *ROWS)
    request = ledger_pb2.QuerySpendRequest(experiment=experiment)
    request.end_time.seconds = 10**13  # past any date a database can hold
    reply = await stub.QuerySpend(request, metadata=SERVICE, timeout=5)

    assert reply.total_cost_nano_usd > 0


async def test_a_filter_with_a_nul_is_refused_on_every_backend(ledger_server: Ledger) -> None:
    stub, _ = ledger_server
    await record_all(stub, *ROWS)
    refused = []
    for call in (
        _spend(stub, MEMBER, experiment="tri\x00al"),
        _spend(stub, SERVICE, feature="tickets\x00"),
        export_all(stub, MEMBER, experiment="\x00"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        refused.append((caught.value.code(), (caught.value.details() or "").split(":")[0]))

    assert refused == [
        (grpc.StatusCode.INVALID_ARGUMENT, "experiment"),
        (grpc.StatusCode.INVALID_ARGUMENT, "feature"),
        (grpc.StatusCode.INVALID_ARGUMENT, "experiment"),
    ]
    assert len(await export_all(stub, MEMBER, experiment="trial")) == 2  # the rest still answers
