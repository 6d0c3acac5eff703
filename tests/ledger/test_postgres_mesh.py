"""The mesh with its ledger on PostgreSQL answers chargeback exactly as on SQLite."""

from __future__ import annotations

from pathlib import Path

import grpc
import psycopg
from opentelemetry.sdk.trace import TracerProvider

from costmesh.inference.v1 import inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh_simulator import OpenAISimulator
from services import SERVICES
from services.common.config import load_config
from services.mesh import start_mesh
from tests.conftest import AUTH, mesh_env, read_your_writes, user_request
from tests.postgres import fresh_schema


async def test_spend_from_a_postgres_ledger_is_the_sum_of_call_costs(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    with fresh_schema() as database:
        env = {**mesh_env(simulator, tmp_path), "LEDGER_DATABASE": database}
        running = await start_mesh(load_config(env=env), env, SERVICES, TracerProvider(), port=0)
        try:
            address = f"127.0.0.1:{running.port}"
            interceptors = read_your_writes(running)
            async with grpc.aio.insecure_channel(address, interceptors=interceptors) as channel:
                inference = inference_pb2_grpc.InferenceServiceStub(channel)
                replies = [
                    await inference.Complete(user_request(q), metadata=AUTH, timeout=10)
                    for q in ("Where is my card?", "Where is my card?", "Close my account")
                ]
                spend = await ledger_pb2_grpc.LedgerServiceStub(channel).QuerySpend(
                    ledger_pb2.QuerySpendRequest(group_by=ledger_pb2.GROUP_BY_MODEL),
                    metadata=AUTH,
                    timeout=5,
                )
        finally:
            await running.stop(grace=1)
        with psycopg.connect(database) as db:
            stored = db.execute("SELECT COUNT(*), SUM(cost_nano_usd) FROM usage").fetchone()

    total = sum(r.cost_nano_usd for r in replies)
    assert spend.total_cost_nano_usd == total
    assert [(row.key, row.calls, row.cached_calls) for row in spend.rows] == [("gpt-4o-mini", 3, 1)]
    assert stored == (3, total)
    assert not (tmp_path / "ledger.sqlite3").exists(), "nothing went to the embedded store"
