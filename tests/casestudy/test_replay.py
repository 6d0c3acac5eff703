"""`costmesh replay` against a real mesh: both policies, the report equal to the
ledger, the A/B split's ratio, and `costmesh demo` on a slice of the bundled workload."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import math
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from services.casestudy import replay
from services.casestudy.report import build_report
from services.casestudy.support_workload import bundled_workload_path
from services.casestudy.workload import Message, WorkloadRequest, read_workload, write_workload
from services.cli import main
from services.inference.simulator import OpenAISimulator
from tests.conftest import AUTH, Mesh, ledger_rows, running_mesh

CONTROL, TREATMENT = types_pb2.ARM_CONTROL, types_pb2.ARM_TREATMENT
CONFIG = """
[features.drafts]
router = "rules"
tier = "simple"
cache_mode = "exact"

[features.labels]
router = "rules"
tier = "simple"
cache_mode = "off"
"""
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def _workload(count: int, distinct: int) -> list[WorkloadRequest]:
    """Requests alternating between a cached and an uncached feature; questions repeat
    every `distinct`, each question its own label."""
    return [
        WorkloadRequest(
            id=f"w{i}",
            timestamp=T0 + timedelta(seconds=30 * i),
            team="demo",
            feature="drafts" if i % 2 else "labels",
            messages=(Message("user", f"Question {i % distinct}"),),
            label=f"intent-{i % distinct}",
            tier="complex" if i % distinct == 0 else "simple",
            max_tokens=50,
        )
        for i in range(count)
    ]


@pytest.fixture
async def mesh(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(simulator, tmp_path, CONFIG) as running:
        yield running


async def _replay(mesh: Mesh, planned: list[replay.Planned], experiment: str) -> replay.Outcome:
    seen: list[int] = []
    outcome = await replay.send_all(
        mesh.channel,
        AUTH,
        planned,
        experiment,
        concurrency=8,
        speed=None,
        progress=lambda done, total: seen.append(done),
    )
    assert seen[-1] == len(planned), "the progress bar reaches the end"
    return outcome


async def test_both_policies_report_exactly_what_the_ledger_recorded(mesh: Mesh) -> None:
    workload = _workload(40, distinct=10)
    planned = replay.plan(workload, "both", 0.5, seed=0)
    outcome = await _replay(mesh, planned, "exp-both")
    rows = await replay.ledger_rows(mesh.channel, AUTH, "exp-both", outcome.answered)
    tiers = {"gpt-4o": "complex", "gpt-4o-mini": "simple"}
    report = build_report(rows, replay.truth(planned, "exp-both"), tiers, 40, simulated=True)
    by_arm = await mesh.ledger.QuerySpend(
        ledger_pb2.QuerySpendRequest(experiment="exp-both", group_by=ledger_pb2.GROUP_BY_ARM),
        metadata=AUTH,
        timeout=5,
    )
    ledger = {row.key: row for row in by_arm.rows}

    assert (outcome.answered, outcome.failures) == (80, Counter())
    assert outcome.simulated == 80, "the simulator's answers are labelled"
    assert report.total.control is not None
    assert report.total.treatment is not None
    for stats, key in ((report.total.control, "control"), (report.total.treatment, "treatment")):
        assert stats.requests == ledger[key].calls == 40
        assert stats.cost_nano_usd == ledger[key].cost_nano_usd
        assert stats.cache_hits == ledger[key].cached_calls
    assert report.total.control.cache_hits == 0, "the baseline policy has no cache"
    # 20 cached-feature requests over 5 distinct questions: 15 repeats are hits.
    assert report.total.treatment.cache_hits == 15
    assert report.total.treatment.quality.judged_hits == 15, "each hit names its source"
    assert report.total.treatment.quality.false_hits == 0
    assert dict(report.total.treatment.model_mix)["gpt-4o-mini"] == 25
    assert dict(report.total.control.model_mix) == {"gpt-4o": 40}
    assert report.total.treatment.quality.complex_on_small == 4  # Question 0, four misses


async def test_an_ab_split_holds_its_ratio_and_every_row_has_its_arm(mesh: Mesh) -> None:
    workload = _workload(300, distinct=300)
    planned = replay.plan(workload, "split", 0.25, seed=7)
    outcome = await _replay(mesh, planned, "exp-split")
    rows = await ledger_rows(mesh)

    control = sum(p.arm == CONTROL for p in planned)
    assert abs(control / 300 - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 300)
    assert outcome.answered == 300
    assert len(rows) == 300
    assert Counter(r.arm for r in rows) == {CONTROL: control, TREATMENT: 300 - control}
    assert {r.experiment for r in rows} == {"exp-split"}
    sent = {p.request_id("exp-split"): p.arm for p in planned}
    assert all(sent[r.client_request_id] == r.arm for r in rows)


def test_plan_refuses_a_share_a_split_cannot_use() -> None:
    with pytest.raises(ValueError, match="control share"):
        replay.plan(_workload(2, 2), "split", 1.0, seed=0)


async def test_the_command_prints_the_report_and_writes_csv_and_html(
    mesh: Mesh, tmp_path: Path
) -> None:
    workload_path = tmp_path / "w.jsonl"
    write_workload(workload_path, _workload(20, distinct=5))
    html, table = tmp_path / "r.html", tmp_path / "r.csv"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = await asyncio.to_thread(
            main,
            [
                "replay", str(workload_path), "--addr", mesh.address,
                "--key", "cm-demo-admin-key", "--experiment", "cli",
                "--html", str(html), "--csv", str(table),
            ],
        )  # fmt: skip

    assert code == 0
    assert 'experiment "cli"' in out.getvalue()
    assert "SIMULATED" in out.getvalue()
    assert "<svg" in html.read_text()
    rows = list(csv.DictReader(table.read_text().splitlines()))
    assert {r["arm"] for r in rows} >= {"control", "treatment"}


async def test_a_workload_that_is_not_valid_is_refused_before_anything_is_sent(
    mesh: Mesh, simulator: OpenAISimulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"timestamp": "yesterday", "team": "t", "feature": "drafts",'
        ' "messages": [{"role": "user", "content": "Hi"}]}\n'
    )

    code = await asyncio.to_thread(main, ["replay", str(bad), "--addr", mesh.address])

    assert code == 2
    assert "bad.jsonl:1: timestamp" in capsys.readouterr().err
    assert simulator.call_count == 0


def test_the_demo_replays_the_bundled_workload_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slice of the bundled workload keeps the test short; the command is the same.
    workload = read_workload(bundled_workload_path())[:60]
    path = tmp_path / "slice.jsonl"
    write_workload(path, workload)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-be-used")
    out = tmp_path / "demo"

    code = main(["demo", "--workload", str(path), "--out", str(out)])

    printed = capsys.readouterr().out
    assert code == 0
    assert "SIMULATED" in printed
    for feature in {r.feature for r in workload}:
        assert feature in printed
    assert "cache hit rate" in printed
    assert "complex on a small model" in printed
    assert "false cache hits" in printed
    assert (out / "savings-report.html").read_text().count("<svg") >= 3
    assert (out / "traces.jsonl").read_text().count('"trace_id"') > 120
    assert "costmesh serve" in printed
