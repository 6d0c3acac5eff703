"""Request ids and cached answers belong to a team: no team sees or pays for another's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh_simulator import OpenAISimulator
from services import SERVICES
from services.common.auth import hash_key
from services.common.config import load_config
from services.common.sqlite import open_database, transaction
from services.inference.idempotency import IdempotencyStore
from services.mesh import start_mesh
from tests.conftest import AUTH, mesh_env, user_request

KEYS = {"team-a": "cm-key-of-team-a", "team-b": "cm-key-of-team-b"}
DEMO_DIGEST = hash_key("cm-demo-admin-key")


class TwoTeams:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.inference = inference_pb2_grpc.InferenceServiceStub(channel)
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(channel)

    async def complete(
        self, team: str, request: inference_pb2.CompleteRequest
    ) -> inference_pb2.CompleteResponse:
        metadata = (("authorization", f"Bearer {KEYS[team]}"),)
        return await self.inference.Complete(request, metadata=metadata, timeout=10)

    async def spend_by_team(self) -> dict[str, tuple[int, int]]:
        spend = await self.ledger.QuerySpend(
            ledger_pb2.QuerySpendRequest(group_by=ledger_pb2.GROUP_BY_TEAM),
            metadata=AUTH,
            timeout=5,
        )
        return {row.key: (row.calls, row.cost_nano_usd) for row in spend.rows}


@pytest.fixture
async def teams(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[TwoTeams]:
    entries = [(team, hash_key(key), "member") for team, key in KEYS.items()]
    entries.append(("demo", DEMO_DIGEST, "admin"))
    path = tmp_path / "c.toml"
    path.write_text(
        "".join(
            f'[[auth.keys]]\nteam = "{t}"\nrole = "{r}"\nsha256 = "{d}"\n' for t, d, r in entries
        )
    )
    env = mesh_env(simulator, tmp_path)
    running = await start_mesh(load_config(path, env), env, SERVICES, TracerProvider(), port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield TwoTeams(channel)
    finally:
        await channel.close()
        await running.stop(grace=1)


async def test_the_same_request_id_in_two_teams_is_two_calls(
    teams: TwoTeams, simulator: OpenAISimulator
) -> None:
    a = await teams.complete("team-a", user_request("Order status?", request_id="req-1"))
    b = await teams.complete(
        "team-b", user_request("Refund my order, it arrived broken", request_id="req-1")
    )

    assert b.content == "[simulated] Answer to: Refund my order, it arrived broken"
    assert simulator.call_count == 2
    assert await teams.spend_by_team() == {
        "team-a": (1, a.cost_nano_usd),
        "team-b": (1, b.cost_nano_usd),
    }
    assert a.cost_nano_usd != b.cost_nano_usd


async def test_teams_never_share_cached_answers(
    teams: TwoTeams, simulator: OpenAISimulator
) -> None:
    await teams.complete("team-a", user_request("What is the fee for wires?"))
    other = await teams.complete("team-b", user_request("What is the fee for wires?"))
    same = await teams.complete("team-a", user_request("What is the fee for wires?"))

    assert not other.cached
    assert same.cached
    assert simulator.call_count == 2


async def test_reusing_a_request_id_for_another_request_is_already_exists(
    teams: TwoTeams, simulator: OpenAISimulator
) -> None:
    await teams.complete("team-a", user_request("First question", request_id="req-9"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await teams.complete("team-a", user_request("Another question", request_id="req-9"))

    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (caught.value.details() or "").startswith("request_id")
    assert simulator.call_count == 1
    assert (await teams.spend_by_team())["team-a"][0] == 1


async def test_concurrent_repeats_of_a_request_id_share_one_provider_call(
    teams: TwoTeams, simulator: OpenAISimulator
) -> None:
    simulator.set_latency(0.3)
    request = user_request("Slow and retried", request_id="req-retry")
    request.cache_control.no_cache = True

    replies = await asyncio.gather(*(teams.complete("team-a", request) for _ in range(3)))

    assert simulator.call_count == 1
    assert len({r.SerializeToString(deterministic=True) for r in replies}) == 1
    assert (await teams.spend_by_team())["team-a"] == (1, replies[0].cost_nano_usd)


async def test_a_retry_after_the_caller_gave_up_joins_the_answer_under_way(
    teams: TwoTeams, simulator: OpenAISimulator
) -> None:
    simulator.set_latency(0.5)
    request = user_request("Slow answer", request_id="req-gave-up")
    metadata = (("authorization", f"Bearer {KEYS['team-a']}"),)
    with pytest.raises(grpc.aio.AioRpcError) as gave_up:
        await teams.inference.Complete(request, metadata=metadata, timeout=0.2)

    retried = await teams.complete("team-a", request)

    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert retried.content == "[simulated] Answer to: Slow answer"
    assert simulator.call_count == 1, "the abandoned answer was not paid for twice"
    assert (await teams.spend_by_team())["team-a"] == (1, retried.cost_nano_usd)


async def test_a_ledger_row_settles_a_pending_reply_once(tmp_path: Path) -> None:
    store = IdempotencyStore(tmp_path / "i.sqlite3", 3600)
    request = user_request("Charge me later", request_id="r1")
    rows = open_database(tmp_path / "i.sqlite3")  # as the outbox writes the rows

    async def answer() -> inference_pb2.CompleteResponse:
        response = inference_pb2.CompleteResponse(trace_id="t1", cost_pending=True)
        with transaction(rows) as db:
            store.remembered("team", request, response)(db)
        return response

    await store.answer_once("team", request, answer)
    for row_id in ("row-a", "row-a", "row-b"):  # row-a reported delivered twice
        store.settle("team", "r1", "t1", 100, row_id)
    replay = await store.answer_once("team", request, answer)
    store.close()

    assert not replay.cost_pending
    assert replay.cost_nano_usd == 200


async def test_drain_waits_for_the_answers_under_way(tmp_path: Path) -> None:
    store = IdempotencyStore(tmp_path / "i.sqlite3", 3600)
    finished = asyncio.Event()

    async def answer() -> inference_pb2.CompleteResponse:
        await asyncio.sleep(0.2)
        finished.set()
        return inference_pb2.CompleteResponse()

    caller = asyncio.create_task(
        store.answer_once("team", user_request("Hi", request_id="r"), answer)
    )
    await asyncio.sleep(0.01)
    caller.cancel()  # the caller gives up, as at shutdown; the answer goes on
    await store.drain(5)
    store.close()

    assert finished.is_set()


async def test_replays_kept_by_an_earlier_version_survive_the_upgrade(tmp_path: Path) -> None:
    request = user_request("Where is my parcel?", request_id="r-old")
    earlier = tmp_path / "idempotency.sqlite3"
    old = open_database(earlier)  # the file and tables an earlier version wrote
    old.executescript(
        "CREATE TABLE answered (team TEXT NOT NULL, request_id TEXT NOT NULL,"
        " fingerprint TEXT NOT NULL, response BLOB NOT NULL, expires_at REAL NOT NULL,"
        " PRIMARY KEY (team, request_id));"
        "CREATE TABLE settled_rows (row_id TEXT PRIMARY KEY, expires_at REAL NOT NULL);"
    )
    first = inference_pb2.CompleteResponse(content="In transit", trace_id="t-old")
    with transaction(old) as db:
        IdempotencyStore(tmp_path / "scratch.sqlite3", 3600).remembered("team", request, first)(db)
    old.close()

    store = IdempotencyStore(tmp_path / "outbox.sqlite3", 3600, earlier_file=earlier)

    async def answer_again() -> inference_pb2.CompleteResponse:
        raise AssertionError("a remembered request was answered again")

    replay = await store.answer_once("team", request, answer_again)
    store.close()
    assert replay.trace_id == "t-old"
    assert not earlier.exists()
    assert (tmp_path / "idempotency.sqlite3.migrated").exists()
