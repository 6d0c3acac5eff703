"""ExportUsage streams a month of rows page by page; a client may walk away mid-stream."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.types.v1 import types_pb2
from services.common.config import load_config
from services.mesh import start_mesh
from tests.conftest import AUTH

SERVICE = (("authorization", "Bearer cm-test-service"),)


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[ledger_pb2_grpc.LedgerServiceAsyncStub]:
    env = {"COSTMESH_SERVICE_KEY": "cm-test-service", "COSTMESH_DATA_DIR": str(tmp_path)}
    running = await start_mesh(load_config(env=env), env, ["ledger"], TracerProvider(), port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        for batch in range(3):
            await stub.RecordUsage(
                ledger_pb2.RecordUsageRequest(
                    records=[
                        ledger_pb2.UsageRecord(
                            request_id=f"r{batch}-{i}", team="t", feature="f", model="gpt-4o",
                            usage=types_pb2.TokenUsage(input_tokens=10, output_tokens=5),
                        )
                        for i in range(1000)
                    ]
                ),
                metadata=SERVICE,
                timeout=10,
            )  # fmt: skip
        yield stub
    await running.stop(grace=1)


async def test_export_streams_every_row_across_pages(
    ledger: ledger_pb2_grpc.LedgerServiceAsyncStub,
) -> None:
    stream = ledger.ExportUsage(ledger_pb2.ExportUsageRequest(), metadata=AUTH, timeout=10)
    ids = [item.record.request_id async for item in stream]

    assert len(ids) == len(set(ids)) == 3000


async def test_a_client_walking_away_mid_stream_logs_no_error(
    ledger: ledger_pb2_grpc.LedgerServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(3):
        stream = ledger.ExportUsage(ledger_pb2.ExportUsageRequest(), metadata=AUTH, timeout=10)
        first = await stream.read()
        assert isinstance(first, ledger_pb2.ExportUsageResponse)
        assert first.record.request_id
        stream.cancel()
    gc.collect()  # finalises the abandoned server-side generators
    spend = await ledger.QuerySpend(ledger_pb2.QuerySpendRequest(), metadata=SERVICE, timeout=5)
    gc.collect()
    await ledger.QuerySpend(ledger_pb2.QuerySpendRequest(), metadata=SERVICE, timeout=5)

    ours = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name != "opentelemetry.context"
    ]
    assert spend.rows[0].calls == 3000, "the ledger keeps serving"
    assert ours == []
