"""API keys decide the team that pays; callers cannot choose it."""

from __future__ import annotations

import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.inference.v1 import inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh_simulator import OpenAISimulator
from costmesh_tools.cli import main
from services import SERVICES
from services.common.auth import KeyTable
from services.common.config import Config, load_config
from services.mesh import start_mesh
from tests.conftest import AUTH, mesh_env, read_your_writes, user_request


def test_keys_new_prints_a_key_and_a_config_entry_that_accepts_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["keys", "new", "--team", "search", "--role", "member"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"key \(.*\): (\S+)", out)
    assert key is not None
    entry = tomllib.loads(out[out.index("[[auth.keys]]") :])
    table = KeyTable.from_config(Config({"keys": entry["auth"]["keys"]}), service_key=None)

    principal = table.authenticate([("authorization", f"Bearer {key.group(1)}")])

    assert (principal.team, principal.role) == ("search", "member")
    assert key.group(1) not in out[out.index("[[auth.keys]]") :], "only the digest goes in config"


@pytest.fixture
async def member_mesh(
    simulator: OpenAISimulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> AsyncIterator[tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]]]:
    main(["keys", "new", "--team", "search"])
    out = capsys.readouterr().out
    member_key = out.split(": ", 1)[1].split("\n", 1)[0]
    demo = load_config(env={}).section("auth").tables("keys")[0]
    path = tmp_path / "c.toml"
    path.write_text(
        out[out.index("[[auth.keys]]") :]
        + f'\n[[auth.keys]]\nteam = "demo"\nrole = "admin"\nsha256 = "{demo.get_str("sha256")}"\n'
    )
    env = mesh_env(simulator, tmp_path)
    running = await start_mesh(load_config(path, env), env, SERVICES, TracerProvider(), port=0)
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{running.port}", interceptors=read_your_writes(running)
    )
    try:
        yield channel, (("authorization", f"Bearer {member_key}"),)
    finally:
        await channel.close()
        await running.stop(grace=1)


async def test_usage_is_billed_to_the_team_of_the_key_whatever_the_caller_sends(
    member_mesh: tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]],
) -> None:
    channel, member = member_mesh
    spoofed = (*member, ("x-costmesh-team", "demo"), ("team", "demo"))
    await inference_pb2_grpc.InferenceServiceStub(channel).Complete(
        user_request("What does this cost?"), metadata=spoofed, timeout=10
    )
    ledger = ledger_pb2_grpc.LedgerServiceStub(channel)

    all_teams = await ledger.QuerySpend(
        ledger_pb2.QuerySpendRequest(group_by=ledger_pb2.GROUP_BY_TEAM), metadata=AUTH, timeout=5
    )
    own = await ledger.QuerySpend(
        ledger_pb2.QuerySpendRequest(group_by=ledger_pb2.GROUP_BY_TEAM), metadata=member, timeout=5
    )

    assert [row.key for row in all_teams.rows] == ["search"]
    assert [row.key for row in own.rows] == ["search"]


async def test_a_member_key_sees_only_its_own_team_and_cannot_administer_the_cache(
    member_mesh: tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]],
) -> None:
    channel, member = member_mesh
    with pytest.raises(grpc.aio.AioRpcError) as other_team:
        await ledger_pb2_grpc.LedgerServiceStub(channel).QuerySpend(
            ledger_pb2.QuerySpendRequest(team="demo"), metadata=member, timeout=5
        )
    with pytest.raises(grpc.aio.AioRpcError) as invalidate:
        await cache_pb2_grpc.CacheServiceStub(channel).Invalidate(
            cache_pb2.InvalidateRequest(feature="support", tag="doc-1"), metadata=member, timeout=5
        )

    assert other_team.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "team" in (other_team.value.details() or "")
    assert invalidate.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_member_exports_only_its_own_team(
    member_mesh: tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]],
) -> None:
    channel, member = member_mesh
    await inference_pb2_grpc.InferenceServiceStub(channel).Complete(
        user_request("Mine"), metadata=member, timeout=10
    )
    await inference_pb2_grpc.InferenceServiceStub(channel).Complete(
        user_request("Theirs"), metadata=AUTH, timeout=10
    )
    ledger = ledger_pb2_grpc.LedgerServiceStub(channel)

    own = [
        item.record.team
        async for item in ledger.ExportUsage(ledger_pb2.ExportUsageRequest(), metadata=member)
    ]
    stream = ledger.ExportUsage(ledger_pb2.ExportUsageRequest(team="demo"), metadata=member)
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await stream.read()

    assert own == ["search"]
    assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
