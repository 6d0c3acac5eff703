"""Why each call was made and what the router thought, through the real ledger server
on SQLite and on PostgreSQL: answers are calls, overhead only costs."""

from __future__ import annotations

import asyncio
import csv
import io
import math
from datetime import UTC, datetime

import grpc
import pytest

from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_tools.cli import main
from tests.conftest import bad_request_fields
from tests.ledger.conftest import ADMIN_KEY, SERVICE, export_all, record_all, usage_record

DAY_US = 86_400_000_000
MIDNIGHT_US = int(datetime(2025, 11, 26, tzinfo=UTC).timestamp()) * 1_000_000
ROUTED = [
    types_pb2.TierProbability(tier=types_pb2.TIER_SIMPLE, probability=0.125),
    types_pb2.TierProbability(tier=types_pb2.TIER_MODERATE, probability=0.7),
    types_pb2.TierProbability(tier=types_pb2.TIER_COMPLEX, probability=0.175),
]


async def test_purpose_probabilities_and_reason_round_trip(
    ledger_server: tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str],
) -> None:
    stub, _ = ledger_server
    reason = "refund policy question with an account lookup — moderate"
    await record_all(
        stub,
        usage_record(
            "routed",
            purpose=ledger_pb2.CALL_PURPOSE_ROUTING,
            route_probabilities=ROUTED,
            route_reason=reason,
        ),
        usage_record("plain"),
    )

    exported = {r.request_id: r for r in await export_all(stub)}

    routed = exported["routed"]
    assert routed.purpose == ledger_pb2.CALL_PURPOSE_ROUTING
    assert list(routed.route_probabilities) == ROUTED, "every probability, bit for bit"
    assert routed.route_reason == reason
    plain = exported["plain"]
    assert plain.purpose == ledger_pb2.CALL_PURPOSE_UNSPECIFIED
    assert list(plain.route_probabilities) == [], "none given, none invented"
    assert plain.route_reason == ""


async def test_overhead_adds_cost_and_tokens_but_not_calls(
    ledger_server: tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str],
) -> None:
    stub, _ = ledger_server
    recorded = await record_all(
        stub,
        usage_record("answer", purpose=ledger_pb2.CALL_PURPOSE_ANSWER, escalated=True),
        # The writer marks the replaced attempt escalated too: still one escalated call.
        usage_record("attempt", purpose=ledger_pb2.CALL_PURPOSE_ESCALATED_ATTEMPT, escalated=True),
        usage_record("routing", purpose=ledger_pb2.CALL_PURPOSE_ROUTING),
        usage_record(
            "embedding",
            purpose=ledger_pb2.CALL_PURPOSE_CACHE_EMBEDDING,
            cache_outcome=types_pb2.CACHE_OUTCOME_SEMANTIC,
        ),
        usage_record("old-writer"),  # purpose unspecified: an answer
    )
    cost = sum(r.cost_nano_usd for r in recorded.results)
    assert cost > 0

    def spend(start_us: int, end_us: int) -> ledger_pb2.QuerySpendRequest:
        request = ledger_pb2.QuerySpendRequest(group_by=ledger_pb2.GROUP_BY_TEAM)
        request.start_time.FromMicroseconds(start_us)
        request.end_time.FromMicroseconds(end_us)
        return request

    whole_day = spend(MIDNIGHT_US, MIDNIGHT_US + DAY_US)  # from the daily rollup
    afternoon = spend(MIDNIGHT_US + DAY_US // 4, MIDNIGHT_US + DAY_US * 3 // 4)  # from rows
    for request in (whole_day, afternoon):
        response = await stub.QuerySpend(request, metadata=SERVICE, timeout=5)
        (row,) = response.rows
        assert (row.calls, row.escalated_calls, row.cached_calls) == (2, 1, 0)
        assert row.cost_nano_usd == response.total_cost_nano_usd == cost
        assert (row.input_tokens, row.output_tokens) == (5000, 500)


def _probabilities(*pairs: tuple[int, float]) -> list[types_pb2.TierProbability]:
    """Tiers as plain numbers, so that unknown ones can be sent too."""
    return [
        types_pb2.TierProbability(tier=types_pb2.Tier.ValueType(t), probability=p) for t, p in pairs
    ]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"route_probabilities": _probabilities((1, 0.5), (2, 1.5))},
         "records[1].route_probabilities[1].probability"),
        ({"route_probabilities": _probabilities((3, -0.01))},
         "records[1].route_probabilities[0].probability"),
        ({"route_probabilities": _probabilities((3, math.nan))},
         "records[1].route_probabilities[0].probability"),
        ({"route_probabilities": _probabilities((0, 0.5))},
         "records[1].route_probabilities[0].tier"),
        ({"route_probabilities": _probabilities((7, 0.5))},
         "records[1].route_probabilities[0].tier"),
        ({"route_probabilities": _probabilities((2, 0.5), (3, 0.25), (2, 0.25))},
         "records[1].route_probabilities[2].tier"),
        ({"purpose": 99}, "records[1].purpose"),
        ({"route_reason": "x" * 1001}, "records[1].route_reason"),
        ({"experiment": "x" * 101}, "records[1].experiment"),
        ({"experiment": "trial", "arm": 3}, "records[1].arm"),
        ({"arm": types_pb2.ARM_CONTROL}, "records[1].arm"),
        ({"cache_source_request_id": "x" * 129}, "records[1].cache_source_request_id"),
    ],
    ids=["above one", "negative", "nan", "unspecified tier", "unknown tier", "tier twice",
         "unknown purpose", "long reason", "long experiment", "unknown arm",
         "arm without experiment", "long cache source"],
)  # fmt: skip
async def test_a_malformed_field_is_named_and_nothing_of_the_batch_is_stored(
    ledger_server: tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str],
    fields: dict[str, object],
    field: str,
) -> None:
    stub, _ = ledger_server
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await record_all(stub, usage_record("fine"), usage_record("bad", **fields))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == [field]
    assert await export_all(stub) == []


async def test_a_reason_of_exactly_the_limit_is_kept(
    ledger_server: tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str],
) -> None:
    stub, _ = ledger_server
    await record_all(stub, usage_record("r", route_reason="é" * 1000))

    (record,) = await export_all(stub)
    assert record.route_reason == "é" * 1000, "characters, not bytes"


async def test_export_csv_has_purpose_reason_and_probabilities(
    ledger_server: tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    stub, address = ledger_server
    await record_all(
        stub,
        usage_record(
            "a",
            purpose=ledger_pb2.CALL_PURPOSE_ESCALATED_ATTEMPT,
            route_probabilities=ROUTED[1:],
            route_reason="needs reasoning, says the router",
        ),
        usage_record("b"),
    )

    code = await asyncio.to_thread(
        main, ["ledger", "export", "--addr", address, "--key", ADMIN_KEY]
    )

    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert code == 0
    new = ["purpose", "route_reason", "p_simple", "p_moderate", "p_complex"]
    assert [[r[c] for c in new] for r in rows] == [
        ["escalated_attempt", "needs reasoning, says the router", "0.0", "0.7", "0.175"],
        ["unspecified", "", "0.0", "0.0", "0.0"],
    ]
