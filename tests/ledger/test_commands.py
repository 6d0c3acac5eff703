"""`costmesh ledger report` and `export` against a running mesh."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from decimal import Decimal
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from costmesh_tools.cli import main
from services.common.config import load_config
from services.mesh import start_mesh
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


async def test_export_carries_every_ledger_field(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    await _calls(mesh)

    code, out = await _run(["ledger", "export", "--addr", mesh.address, "--key", DEMO_KEY], capsys)

    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["baseline_model"] for r in rows} == {"gpt-4o"}
    hit = rows[1]
    assert hit["cache_source_request_id"] == rows[0]["request_id"]
    # A hit costs nothing and counts, against the baseline, what its answer cost then.
    assert hit["counterfactual_cost_nano_usd"] == rows[0]["counterfactual_cost_nano_usd"]
    assert {"baseline_input_tokens", "baseline_output_tokens"} <= set(hit)
    assert {"experiment", "arm"} <= set(rows[0])


async def test_a_focus_feed_sums_to_the_ledger_in_dollars_with_team_tags(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    costs = await _calls(mesh)

    code, out = await _run(
        ["ledger", "export", "--addr", mesh.address, "--key", DEMO_KEY, "--format", "focus"],
        capsys,
    )

    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0
    assert sum(Decimal(r["BilledCost"]) for r in rows) == Decimal(sum(costs)) / 10**9
    assert {r["BillingCurrency"] for r in rows} == {"USD"}
    assert {r["SubAccountId"] for r in rows} == {"demo"}
    first = rows[0]
    assert first["BilledCost"] == first["EffectiveCost"] == first["ListCost"]
    assert first["ChargePeriodStart"].endswith("Z")
    assert first["BillingPeriodStart"] <= first["ChargePeriodStart"] < first["BillingPeriodEnd"]
    assert json.loads(first["Tags"]) == {
        "costmesh/team": "demo", "costmesh/feature": "support", "costmesh/tier": "moderate",
        "costmesh/cache_outcome": "miss", "costmesh/purpose": "answer",
    }  # fmt: skip
    assert int(first["ConsumedQuantity"]) > 0
    assert first["ConsumedUnit"] == "Tokens"


async def test_an_export_that_fails_writes_nothing(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await _calls(mesh)
    target = tmp_path / "usage.csv"
    base = ["ledger", "export", "--addr", mesh.address, "--out", str(target)]

    refused, out = await _run([*base, "--key", "wrong"], capsys)
    assert refused == 1
    assert out == ""
    assert not target.exists()
    assert not (tmp_path / ".usage.csv.partial").exists()

    code, _ = await _run([*base, "--key", DEMO_KEY], capsys)
    assert code == 0
    assert len(target.read_text().splitlines()) == 4  # the header and three rows


async def test_an_empty_period_says_so_instead_of_printing_zeros(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    await _calls(mesh)
    period = ["--from", "2020-01-01", "--to", "2020-01-31"]

    code = await asyncio.to_thread(
        main, ["ledger", "report", "--addr", mesh.address, "--key", DEMO_KEY, *period]
    )
    report_err = capsys.readouterr().err
    exported = await asyncio.to_thread(
        main, ["ledger", "export", "--addr", mesh.address, "--key", DEMO_KEY, "--team", "x"]
    )
    export_err = capsys.readouterr().err

    assert code == exported == 0
    assert "no usage rows between 2020-01-01 and 2020-01-31" in report_err
    assert "no usage rows between the first and now for team 'x'" in export_err


async def test_any_report_renders_as_one_self_contained_html_page(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    await _calls(mesh)
    page = tmp_path / "spend.html"

    code, _ = await _run(
        ["ledger", "report", "--addr", mesh.address, "--key", DEMO_KEY, "--by", "team,feature",
         "--format", "html", "--out", str(page)],
        capsys,
    )  # fmt: skip

    html = page.read_text()
    assert code == 0
    assert html.startswith("<!DOCTYPE html>")
    assert "default-src 'none'" in html  # fetches nothing
    assert '<th scope="row">demo</th><td>support</td><td>2</td>' in html
    assert "<h2>Model mix</h2>" in html
    assert "gpt-4o-mini" in html


async def test_asking_a_process_without_the_ledger_says_where_to_point(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"COSTMESH_SERVICE_KEY": "split-test-key", "COSTMESH_DATA_DIR": str(tmp_path)}
    cache_only = await start_mesh(load_config(env=env), env, ["cache"], TracerProvider(), port=0)
    try:
        code = await asyncio.to_thread(
            main, ["ledger", "report", "--addr", f"127.0.0.1:{cache_only.port}", "--key", DEMO_KEY]
        )
    finally:
        await cache_only.stop(grace=0)

    err = capsys.readouterr().err
    assert code == 1
    assert "UNIMPLEMENTED" in err
    assert "point --addr at the process that does" in err
    assert "peers.ledger" in err
