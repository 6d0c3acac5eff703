"""Why each call was made and what the router thought, through the real ledger server
on SQLite and on PostgreSQL: answers are calls, overhead only costs."""

from __future__ import annotations

import asyncio
import csv
import io
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from opentelemetry.sdk.trace import TracerProvider

from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.types.v1 import types_pb2
from services.cli import main
from services.common.config import load_config
from services.mesh import start_mesh
from tests.conftest import bad_request_fields
from tests.postgres import fresh_schema

SERVICE_KEY = "cm-test-service"
SERVICE = (("authorization", f"Bearer {SERVICE_KEY}"),)
NOON = datetime(2025, 11, 26, 12, tzinfo=UTC)
DAY_US = 86_400_000_000
MIDNIGHT_US = int(datetime(2025, 11, 26, tzinfo=UTC).timestamp()) * 1_000_000
ROUTED = [
    types_pb2.TierProbability(tier=types_pb2.TIER_SIMPLE, probability=0.125),
    types_pb2.TierProbability(tier=types_pb2.TIER_MODERATE, probability=0.7),
    types_pb2.TierProbability(tier=types_pb2.TIER_COMPLEX, probability=0.175),
]


@contextmanager
def _database(kind: str) -> Iterator[str]:
    if kind == "sqlite":
        yield "ledger.sqlite3"
        return
    with fresh_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str]]:
    """The ledger alone, served over gRPC; yields its stub and its address."""
    with _database(request.param) as database:
        env = {
            "COSTMESH_SERVICE_KEY": SERVICE_KEY,
            "COSTMESH_DATA_DIR": str(tmp_path),
            "LEDGER_DATABASE": database,
        }
        running = await start_mesh(load_config(env=env), env, ["ledger"], TracerProvider(), port=0)
        address = f"127.0.0.1:{running.port}"
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                yield ledger_pb2_grpc.LedgerServiceStub(channel), address
        finally:
            await running.stop(grace=1)


def _record(request_id: str, **fields: object) -> ledger_pb2.UsageRecord:
    when = timestamp_pb2.Timestamp()
    when.FromDatetime(NOON)
    base: dict[str, object] = {
        "request_id": request_id,
        "team": "support",
        "feature": "tickets",
        "model": "gpt-4o-mini",
        "time": when,
        "usage": types_pb2.TokenUsage(input_tokens=1000, output_tokens=100),
    }
    return ledger_pb2.UsageRecord(**{**base, **fields})  # type: ignore[arg-type]


async def _record_all(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub, *records: ledger_pb2.UsageRecord
) -> ledger_pb2.RecordUsageResponse:
    request = ledger_pb2.RecordUsageRequest(records=records)
    return await stub.RecordUsage(request, metadata=SERVICE, timeout=10)


async def _export(stub: ledger_pb2_grpc.LedgerServiceAsyncStub) -> list[ledger_pb2.UsageRecord]:
    stream = stub.ExportUsage(ledger_pb2.ExportUsageRequest(), metadata=SERVICE, timeout=10)
    return [item.record async for item in stream]


async def test_purpose_probabilities_and_reason_round_trip(
    ledger: tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str],
) -> None:
    stub, _ = ledger
    reason = "refund policy question with an account lookup — moderate"
    await _record_all(
        stub,
        _record(
            "routed",
            purpose=ledger_pb2.CALL_PURPOSE_ROUTING,
            route_probabilities=ROUTED,
            route_reason=reason,
        ),
        _record("plain"),
    )

    exported = {r.request_id: r for r in await _export(stub)}

    routed = exported["routed"]
    assert routed.purpose == ledger_pb2.CALL_PURPOSE_ROUTING
    assert list(routed.route_probabilities) == ROUTED, "every probability, bit for bit"
    assert routed.route_reason == reason
    plain = exported["plain"]
    assert plain.purpose == ledger_pb2.CALL_PURPOSE_UNSPECIFIED
    assert list(plain.route_probabilities) == [], "none given, none invented"
    assert plain.route_reason == ""


async def test_overhead_adds_cost_and_tokens_but_not_calls(
    ledger: tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str],
) -> None:
    stub, _ = ledger
    recorded = await _record_all(
        stub,
        _record("answer", purpose=ledger_pb2.CALL_PURPOSE_ANSWER, escalated=True),
        # The writer marks the replaced attempt escalated too: still one escalated call.
        _record("attempt", purpose=ledger_pb2.CALL_PURPOSE_ESCALATED_ATTEMPT, escalated=True),
        _record("routing", purpose=ledger_pb2.CALL_PURPOSE_ROUTING),
        _record(
            "embedding",
            purpose=ledger_pb2.CALL_PURPOSE_CACHE_EMBEDDING,
            cache_outcome=types_pb2.CACHE_OUTCOME_SEMANTIC,
        ),
        _record("old-writer"),  # purpose unspecified: an answer
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
    ],
    ids=["above one", "negative", "nan", "unspecified tier", "unknown tier", "tier twice",
         "unknown purpose", "long reason"],
)  # fmt: skip
async def test_a_malformed_field_is_named_and_nothing_of_the_batch_is_stored(
    ledger: tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str],
    fields: dict[str, object],
    field: str,
) -> None:
    stub, _ = ledger
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _record_all(stub, _record("fine"), _record("bad", **fields))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == [field]
    assert await _export(stub) == []


async def test_a_reason_of_exactly_the_limit_is_kept(
    ledger: tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str],
) -> None:
    stub, _ = ledger
    await _record_all(stub, _record("r", route_reason="é" * 1000))

    (record,) = await _export(stub)
    assert record.route_reason == "é" * 1000, "characters, not bytes"


async def test_export_csv_has_purpose_reason_and_probabilities(
    ledger: tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    stub, address = ledger
    await _record_all(
        stub,
        _record(
            "a",
            purpose=ledger_pb2.CALL_PURPOSE_ESCALATED_ATTEMPT,
            route_probabilities=ROUTED[1:],
            route_reason="needs reasoning, says the router",
        ),
        _record("b"),
    )

    code = await asyncio.to_thread(
        main, ["ledger", "export", "--addr", address, "--key", SERVICE_KEY]
    )

    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert code == 0
    new = ["purpose", "route_reason", "p_simple", "p_moderate", "p_complex"]
    assert [[r[c] for c in new] for r in rows] == [
        ["escalated_attempt", "needs reasoning, says the router", "0.0", "0.7", "0.175"],
        ["unspecified", "", "0.0", "0.0", "0.0"],
    ]
