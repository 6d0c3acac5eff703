"""`costmesh ledger report` and `export` against a running mesh."""

from __future__ import annotations

import asyncio
import csv
import io
from decimal import Decimal

import pytest

from costmesh_tools.cli import main
from tests.conftest import AUTH, DEMO_KEY, Mesh, user_request


async def _calls(mesh: Mesh) -> list[int]:
    costs = []
    for feature, question in (("support", "Refund?"), ("support", "Refund?"), ("default", "Hi")):
        reply = await mesh.inference.Complete(
            user_request(question, feature=feature), metadata=AUTH, timeout=10
        )
        costs.append(reply.cost_nano_usd)
    return costs


async def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = await asyncio.to_thread(main, args)
    return code, capsys.readouterr().out


async def test_report_csv_is_the_chargeback_table_to_the_nano_dollar(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    costs = await _calls(mesh)

    code, out = await _run(
        ["ledger", "report", "--addr", mesh.address, "--key", DEMO_KEY, "--format", "csv"], capsys
    )

    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0
    assert [(r["team"], r["feature"], r["calls"]) for r in rows] == [
        ("demo", "default", "1"),
        ("demo", "support", "2"),
        ("TOTAL", "", "3"),
    ]
    assert Decimal(rows[-1]["cost_usd"]) == Decimal(sum(costs)) / 10**9
    assert rows[1]["cache_hit_pct"] == "50.0"
    assert Decimal(rows[-1]["savings_usd"]) > 0


async def test_report_table_shows_the_model_mix(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    await _calls(mesh)

    code, out = await _run(["ledger", "report", "--addr", mesh.address, "--key", DEMO_KEY], capsys)

    assert code == 0
    assert "model mix" in out
    assert "gpt-4o-mini" in out.split("model mix")[1]


async def test_export_writes_every_record(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    costs = await _calls(mesh)

    code, out = await _run(["ledger", "export", "--addr", mesh.address, "--key", DEMO_KEY], capsys)

    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0
    assert [int(r["cost_nano_usd"]) for r in rows] == costs
    assert [r["cache_outcome"] for r in rows] == ["miss", "exact", "miss"]


async def test_a_bad_key_is_one_line_and_exit_1(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await asyncio.to_thread(
        main, ["ledger", "report", "--addr", mesh.address, "--key", "wrong"]
    )

    assert code == 1
    assert "costmesh: UNAUTHENTICATED: authorization: unknown API key" in capsys.readouterr().err
