"""Randomised records through RecordUsage and QuerySpend: every total agrees to the
nano-dollar with a calculation made here from the tokens and the published prices."""

from __future__ import annotations

import contextlib
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from opentelemetry.sdk.trace import TracerProvider

from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.types.v1 import types_pb2
from services.common.config import load_config
from services.mesh import start_mesh
from tests.postgres import fresh_schema

SERVICE = (("authorization", "Bearer cm-test-service"),)
# USD per million tokens: input, cached input, output; batch halves the price.
PRICES = {"gpt-4o": ("2.50", "1.25", "10.00"), "gpt-4o-mini": ("0.15", "0.075", "0.60")}


def expected_nano(model: str, usage: types_pb2.TokenUsage, batch: bool) -> int:
    per_input, per_cached, per_output = (Fraction(p) for p in PRICES[model])
    usd = (
        (usage.input_tokens - usage.cached_input_tokens) * per_input
        + usage.cached_input_tokens * per_cached
        + usage.output_tokens * per_output
    ) / 1_000_000
    return round(usd * (Fraction(1, 2) if batch else 1) * 1_000_000_000)


def random_records(seed: int, count: int) -> Iterator[ledger_pb2.UsageRecord]:
    rng = random.Random(seed)
    now = datetime.now(UTC)
    for i in range(count):
        input_tokens = rng.randrange(0, 50_000)
        when = timestamp_pb2.Timestamp()
        when.FromDatetime(now - timedelta(seconds=rng.randrange(40 * 86_400)))
        yield ledger_pb2.UsageRecord(
            request_id=f"r{i}",
            time=when,
            team=rng.choice(["support", "search"]),
            feature=rng.choice(["tickets", "faq"]),
            model=rng.choice(list(PRICES)),
            usage=types_pb2.TokenUsage(
                input_tokens=input_tokens,
                cached_input_tokens=rng.randrange(0, input_tokens + 1),
                output_tokens=rng.randrange(0, 4_000),
            ),
            batch=rng.random() < 0.2,
        )


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ledger_pb2_grpc.LedgerServiceAsyncStub]:
    env = {"COSTMESH_SERVICE_KEY": "cm-test-service", "COSTMESH_DATA_DIR": str(tmp_path)}
    with fresh_schema() if request.param == "postgres" else contextlib.nullcontext("") as database:
        if database:
            env["LEDGER_DATABASE"] = database
        running = await start_mesh(load_config(env=env), env, ["ledger"], TracerProvider(), port=0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield ledger_pb2_grpc.LedgerServiceStub(channel)
        await running.stop(grace=1)


@pytest.mark.parametrize("seed", [3, 4])
async def test_spend_equals_an_independent_calculation_on_random_records(
    ledger: ledger_pb2_grpc.LedgerServiceAsyncStub, seed: int
) -> None:
    records = list(random_records(seed, 600))
    for start in range(0, len(records), 250):
        await ledger.RecordUsage(
            ledger_pb2.RecordUsageRequest(records=records[start : start + 250]),
            metadata=SERVICE,
            timeout=30,
        )
    expected: dict[tuple[str, str], int] = defaultdict(int)
    for r in records:
        expected[(r.team, r.model)] += expected_nano(r.model, r.usage, r.batch)

    spend = await ledger.QuerySpend(
        ledger_pb2.QuerySpendRequest(
            group_by=ledger_pb2.GROUP_BY_TEAM, then_by=ledger_pb2.GROUP_BY_MODEL
        ),
        metadata=SERVICE,
        timeout=30,
    )

    assert {(r.key, r.second_key): r.cost_nano_usd for r in spend.rows} == dict(expected)
    assert spend.total_cost_nano_usd == sum(expected.values())
