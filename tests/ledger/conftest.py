"""Every ledger store test runs on SQLite and on the real PostgreSQL, and so does the
ledger server alone."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from opentelemetry.sdk.trace import TracerProvider

from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.types.v1 import types_pb2
from services.common.auth import hash_key
from services.common.config import load_config
from services.ledger.postgres_store import PostgresUsageStore
from services.ledger.rows import UsageStore
from services.ledger.stores import open_store
from services.mesh import start_mesh
from tests.postgres import fresh_schema

OpenStore = Callable[[], UsageStore]
SERVICE_KEY = "cm-test-service"
SERVICE = (("authorization", f"Bearer {SERVICE_KEY}"),)
ADMIN_KEY = "cm-test-ledger-admin"  # an operator of team ops, reading every team
ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)
# A member of the search team: sees that team's rows only.
MEMBER_KEY = "cm-test-search-member"
MEMBER = (("authorization", f"Bearer {MEMBER_KEY}"),)
NOON = datetime(2025, 11, 26, 12, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def open_ledger_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens a store on one database; call it again to reopen the same database."""
    opened: list[UsageStore] = []

    def opener(database: str) -> OpenStore:
        def open_one() -> UsageStore:
            opened.append(open_store(database, tmp_path))
            kind = "postgres" if isinstance(opened[-1], PostgresUsageStore) else "sqlite"
            assert kind == request.param, f"{database!r} opened a {kind} store"
            return opened[-1]

        return open_one

    if request.param == "sqlite":
        yield opener("ledger.sqlite3")
    else:
        with fresh_schema() as conninfo:
            yield opener(conninfo)
            for store in opened:
                store.close()
            opened.clear()
    for store in opened:
        store.close()


@contextmanager
def _database(kind: str) -> Iterator[str]:
    if kind == "sqlite":
        yield "ledger.sqlite3"
        return
    with fresh_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger_server(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str]]:
    """The ledger alone, served over gRPC; yields its stub and its address."""
    with _database(request.param) as database:
        env = {
            "COSTMESH_SERVICE_KEY": SERVICE_KEY,
            "COSTMESH_API_KEYS": f"search:member:{hash_key(MEMBER_KEY)},"
            f"ops:admin:{hash_key(ADMIN_KEY)}",
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


def stamp(when: datetime) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(when)
    return value


def usage_record(request_id: str, **fields: object) -> ledger_pb2.UsageRecord:
    """A support/tickets call at NOON on gpt-4o-mini, 1,000 input and 100 output tokens."""
    base: dict[str, object] = {
        "request_id": request_id,
        "team": "support",
        "feature": "tickets",
        "model": "gpt-4o-mini",
        "time": stamp(NOON),
        "usage": types_pb2.TokenUsage(input_tokens=1000, output_tokens=100),
    }
    return ledger_pb2.UsageRecord(**{**base, **fields})  # type: ignore[arg-type]


async def record_all(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub, *records: ledger_pb2.UsageRecord
) -> ledger_pb2.RecordUsageResponse:
    request = ledger_pb2.RecordUsageRequest(records=records)
    return await stub.RecordUsage(request, metadata=SERVICE, timeout=10)


async def export_all(
    stub: ledger_pb2_grpc.LedgerServiceAsyncStub,
    metadata: tuple[tuple[str, str]] = ADMIN,  # services do not export
    *,
    team: str = "",
    experiment: str = "",
) -> list[ledger_pb2.UsageRecord]:
    """Every record ExportUsage gives `metadata`'s key, for one team and experiment."""
    request = ledger_pb2.ExportUsageRequest(team=team, experiment=experiment)
    stream = stub.ExportUsage(request, metadata=metadata, timeout=10)
    return [item.record async for item in stream]
