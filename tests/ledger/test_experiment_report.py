"""`costmesh ledger report --experiment NAME` against a running mesh: the experiment's
rows, and no others, compared control against treatment to the nano-dollar."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2

from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from costmesh_tools.cli import main
from services.common.auth import hash_key
from tests.conftest import DEMO_KEY, Mesh, running_mesh

WRITER = (("authorization", "Bearer cm-test-writer"),)
CONFIG = f"""
[[auth.keys]]
team = "demo"
role = "admin"
sha256 = "{hash_key(DEMO_KEY)}"

[[auth.keys]]
team = "writers"
role = "service"
sha256 = "{hash_key("cm-test-writer")}"
"""
START = datetime(2025, 11, 26, 9, tzinfo=UTC)
TOKENS = types_pb2.TokenUsage(input_tokens=1000, output_tokens=100)
ROUTING_TOKENS = types_pb2.TokenUsage(input_tokens=200, output_tokens=1)
# Nano-USD at USD 2.50 / 10.00 (gpt-4o) and 0.15 / 0.60 (gpt-4o-mini) per million
# input / output tokens.
GPT_4O = 1000 * 2500 + 100 * 10_000  # 3,500,000
MINI = 1000 * 150 + 100 * 600  # 210,000
ROUTING = 200 * 150 + 1 * 600  # 30,600
CONTROL_COST = 4 * GPT_4O
TREATMENT_COST = 2 * MINI + ROUTING
EXPERIMENT = "checkout-2026"


def _row(request_id: str, minute: int, **fields: object) -> ledger_pb2.UsageRecord:
    when = timestamp_pb2.Timestamp()
    when.FromDatetime(START + timedelta(minutes=minute))
    base: dict[str, object] = {
        "request_id": request_id, "team": "demo", "feature": "support", "time": when,
        "experiment": EXPERIMENT, "baseline_model": "gpt-4o", "usage": TOKENS,
    }  # fmt: skip
    return ledger_pb2.UsageRecord(**{**base, **fields})  # type: ignore[arg-type]


def _hit(
    request_id: str, minute: int, outcome: int, source: str, latency: int
) -> ledger_pb2.UsageRecord:
    return _row(
        request_id, minute, arm=types_pb2.ARM_TREATMENT, model="gpt-4o-mini", latency_ms=latency,
        usage=types_pb2.TokenUsage(), baseline_usage=TOKENS, cache_outcome=outcome,
        cache_source_request_id=source,
    )  # fmt: skip


CONTROL_LATENCIES = (900, 1000, 1100, 1200)
ROWS = [
    *(
        _row(f"c{i}", i, arm=types_pb2.ARM_CONTROL, model="gpt-4o", latency_ms=latency)
        for i, latency in enumerate(CONTROL_LATENCIES)
    ),
    _row("t1", 10, arm=types_pb2.ARM_TREATMENT, model="gpt-4o-mini", latency_ms=300),
    _row("t2", 11, arm=types_pb2.ARM_TREATMENT, model="gpt-4o-mini", latency_ms=400),
    _hit("h1", 12, types_pb2.CACHE_OUTCOME_EXACT, "t1", 20),
    _hit("h2", 13, types_pb2.CACHE_OUTCOME_SEMANTIC, "t2", 30),
    _row("route", 14, arm=types_pb2.ARM_TREATMENT, model="gpt-4o-mini", usage=ROUTING_TOKENS,
         baseline_model="", purpose=ledger_pb2.CALL_PURPOSE_ROUTING),  # overhead
    # Neither is the experiment's: another experiment, and a call in none.
    _row("other", 15, experiment="other", arm=types_pb2.ARM_CONTROL, model="gpt-4o"),
    _row("plain", 16, experiment="", model="gpt-4o"),
]  # fmt: skip


@pytest.fixture
async def mesh(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[Mesh]:
    """The mesh, its ledger holding ROWS (written as a service writes them)."""
    async with running_mesh(simulator, tmp_path, CONFIG) as running:
        request = ledger_pb2.RecordUsageRequest(records=ROWS)
        await running.ledger.RecordUsage(request, metadata=WRITER, timeout=10)
        yield running


async def _report(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], *options: str
) -> tuple[int, str, str]:
    args = ["ledger", "report", "--addr", mesh.address, "--key", DEMO_KEY, *options]
    code = await asyncio.to_thread(main, args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _nano(usd: str) -> Decimal:
    return Decimal(usd) * 10**9


async def test_csv_compares_the_arms_to_the_nano_dollar(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await _report(
        mesh, capsys, "--experiment", EXPERIMENT, "--format", "csv", "--requests-per-day", "1000"
    )

    assert code == 0
    total = {r["arm"]: r for r in csv.DictReader(io.StringIO(out)) if r["scope"] == "total"}
    control, treatment = total["control"], total["treatment"]
    assert (control["requests"], control["overhead_rows"], control["model_mix"]) == (
        "4", "0", "gpt-4o=4",
    )  # fmt: skip
    assert (treatment["requests"], treatment["overhead_rows"], treatment["model_mix"]) == (
        "4", "1", "cache=2;gpt-4o-mini=2",
    )  # fmt: skip
    assert (treatment["exact_hits"], treatment["semantic_hits"]) == ("1", "1")
    assert _nano(control["cost_usd"]) == CONTROL_COST
    assert _nano(treatment["cost_usd"]) == TREATMENT_COST
    assert _nano(treatment["overhead_cost_usd"]) == ROUTING
    # Every treatment answer would have been a gpt-4o call; the routing row claims nothing.
    assert _nano(treatment["counterfactual_cost_usd"]) == 4 * GPT_4O + ROUTING
    # 1,000 requests a day at each arm's cost per request (4 requests each).
    assert _nano(control["daily_cost_usd"]) == CONTROL_COST * 1000 / 4
    assert _nano(treatment["daily_cost_usd"]) == TREATMENT_COST * 1000 / 4
    assert (
        _nano(treatment["savings_monthly_usd"]) == (CONTROL_COST - TREATMENT_COST) * 1000 * 30 / 4
    )
    assert Decimal(treatment["savings_fraction"]) == round(
        1 - Decimal(TREATMENT_COST) / CONTROL_COST, 6
    )
    assert (control["latency_p50_ms"], control["latency_p95_ms"]) == ("1000", "1200")
    assert (treatment["latency_p50_ms"], treatment["latency_p95_ms"]) == ("30", "400")
    assert Decimal(control["latency_mean_ms"]) == sum(CONTROL_LATENCIES) / Decimal(4)


async def test_table_and_html_report_the_same_saving(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    options = ("--experiment", EXPERIMENT, "--requests-per-day", "1000")
    code, table, _ = await _report(mesh, capsys, *options)
    page = tmp_path / "report.html"
    html_code, out, _ = await _report(
        mesh, capsys, *options, "--format", "html", "--out", str(page)
    )

    # A month: control 4 x 3,500,000 nano-USD per 4 requests x 30,000 = $105.00; treatment
    # 450,600 per 4 x 30,000 = $3.3795; saved $101.6205, 96.78% of the cost per request.
    headline = "The optimised policy saves $101.62 a month (96.8%): $105.00 before, $3.38 after."
    assert code == html_code == 0
    assert f'experiment "{EXPERIMENT}"' in table
    assert headline in " ".join(table.split())
    assert "SIMULATED" not in table
    assert out == f"wrote the html report to {page}\n"
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert headline in html


async def test_an_experiment_without_rows_is_one_line_and_exit_1(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    page = tmp_path / "nothing.html"
    code, out, err = await _report(
        mesh, capsys, "--experiment", "nope", "--format", "html", "--out", str(page)
    )

    assert code == 1
    assert (out, err.count("\n")) == ("", 1)
    assert err.startswith("costmesh: experiment 'nope': nothing to report: no ledger rows")
    assert not page.exists()


async def test_rows_answered_by_the_simulator_are_labelled(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    simulated = [
        _row(f"s{arm}", 20 + arm, experiment="demo", arm=arm, model="gpt-4o", provider="simulated")
        for arm in (types_pb2.ARM_CONTROL, types_pb2.ARM_TREATMENT)
    ]
    request = ledger_pb2.RecordUsageRequest(records=simulated)
    await mesh.ledger.RecordUsage(request, metadata=WRITER, timeout=10)

    code, table, _ = await _report(
        mesh, capsys, "--experiment", "demo", "--requests-per-day", "1000"
    )

    assert code == 0
    assert "SIMULATED provider" in table


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (["--config", "x.toml"], "--config needs --experiment"),
        (["--requests-per-day", "10"], "--requests-per-day needs --experiment"),
        (["--experiment", "x", "--by", "team"], "--by does not apply to --experiment reports"),
    ],
)
def test_options_that_do_not_go_together_exit_2(
    options: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ledger", "report", "--addr", "127.0.0.1:9", *options]) == 2
    assert capsys.readouterr().err == f"costmesh: {problem}\n"
