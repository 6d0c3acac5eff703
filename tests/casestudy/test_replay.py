"""`costmesh replay` against a real mesh: both policies, the report equal to the
ledger, the A/B split's ratio, and `costmesh demo` on a slice of the bundled workload."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import math
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from costmesh.inference.v1 import inference_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from costmesh_tools.casestudy import arms, replay, replay_commands
from costmesh_tools.casestudy.ablation import Ablation
from costmesh_tools.casestudy.report import BASELINE, EXACT_HITS, ROUTING, build_report
from costmesh_tools.casestudy.support_workload import bundled_workload_path
from costmesh_tools.casestudy.workload import (
    Message,
    WorkloadRequest,
    read_workload,
    write_workload,
)
from costmesh_tools.cli import main
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
    # Each lever's saving, from the same rows, sums to what the ledger says was saved.
    levers = dict(report.total.treatment.levers)
    saved = ledger["treatment"].counterfactual_cost_nano_usd - ledger["treatment"].cost_nano_usd
    assert sum(levers.values()) == saved
    assert levers[EXACT_HITS] > 0
    assert levers[ROUTING] > 0
    assert dict(report.total.control.levers) == {BASELINE: 0}, "the baseline saves nothing"


async def test_an_ab_split_holds_its_ratio_and_every_row_has_its_arm(mesh: Mesh) -> None:
    workload = _workload(300, distinct=300)
    planned = replay.plan(workload, "split", 0.25, seed=7)
    outcome = await _replay(mesh, planned, "exp-split")
    rows = await ledger_rows(mesh)

    control = sum(r.arm == CONTROL for r in rows)  # what the mesh recorded, not the plan
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
                "--html", str(html), "--csv", str(table), "--requests-per-day", "1000",
            ],
        )  # fmt: skip

    assert code == 0
    assert 'experiment "cli"' in out.getvalue()
    assert "(given)" in out.getvalue()
    assert "40 calls sent, 40 answered, 0 failed" in out.getvalue()
    assert "compared over answered calls only" in out.getvalue()
    assert "SIMULATED" in out.getvalue()
    assert "<svg" in html.read_text()
    rows = list(csv.DictReader(table.read_text().splitlines()))
    assert {r["arm"] for r in rows} >= {"control", "treatment"}


async def test_ablation_arms_measure_each_lever_and_share_the_saving_exactly(
    mesh: Mesh, tmp_path: Path
) -> None:
    workload_path = tmp_path / "w.jsonl"
    write_workload(workload_path, _workload(20, distinct=5))
    table = tmp_path / "r.csv"

    code, out, _ = await _cli(
        *_replay_args(mesh, workload_path, "--experiment", "abl", "--ablate",
                      "--csv", str(table), "--requests-per-day", "1000")
    )  # fmt: skip

    assert code == 0, out
    spend = {}
    for name in ("abl", "abl.no-cache", "abl.no-routing"):
        reply = await mesh.ledger.QuerySpend(
            ledger_pb2.QuerySpendRequest(experiment=name, group_by=ledger_pb2.GROUP_BY_ARM),
            metadata=AUTH, timeout=5,
        )  # fmt: skip
        spend[name] = {row.key: row for row in reply.rows}
    without_cache, without_routing = spend["abl.no-cache"], spend["abl.no-routing"]
    assert set(without_cache) == set(without_routing) == {"treatment"}, "treatment runs only"
    assert without_cache["treatment"].cached_calls == 0
    assert without_routing["treatment"].cached_calls == spend["abl"]["treatment"].cached_calls
    no_routing = [r for r in await ledger_rows(mesh) if r.experiment == "abl.no-routing"]
    assert {r.model for r in no_routing} == {"gpt-4o"}, "every answer on the baseline"
    (total,) = [
        r for r in csv.DictReader(table.read_text().splitlines())
        if (r["scope"], r["arm"]) == ("total", "treatment")
    ]  # fmt: skip
    shares = dict(item.split("=") for item in total["saved_by_ablation_usd"].split(";"))
    saving = spend["abl"]["control"].cost_nano_usd - spend["abl"]["treatment"].cost_nano_usd
    assert set(shares) == {"cache", "routing"}
    assert sum(Decimal(v) for v in shares.values()) * 10**9 == saving
    assert Decimal(shares["cache"]) > 0
    assert Decimal(shares["routing"]) > Decimal(shares["cache"])
    assert "Measured by ablation" in out


def test_a_lever_s_share_is_its_saving_averaged_over_both_orders() -> None:
    # Control 100; the cache alone 80, routing alone 30; both 20. Switched on first the
    # cache saves 20, last only 10 (its hits would have been cheap already): 15.
    # Routing saves 70 first and 60 last: 65.
    measured = Ablation(control=100, treatment=20, without={"cache": 30, "routing": 80})
    odd = Ablation(control=101, treatment=20, without={"cache": 30, "routing": 80})

    assert measured.shares() == [("cache", 15), ("routing", 65)]
    assert odd.shares() == [("cache", 15), ("routing", 66)], "rounding goes to the last lever"


def test_the_demo_ablates_by_default_only_where_the_arms_run_the_same_requests() -> None:
    def names(mode: str) -> list[str]:
        return replay_commands._experiment_names("x", argparse.Namespace(ablate=None, mode=mode))

    assert names("both") == ["x", "x.no-cache", "x.no-routing"]
    assert names("split") == ["x"], "an A/B split has nothing to ablate"


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
    assert "Measured by ablation" in printed, "the demo measures each lever"
    spans = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    ablated = Counter(
        (s["attributes"]["costmesh.experiment"].rpartition(".")[2],
         s["attributes"].get("costmesh.cache.outcome"))
        for s in spans
        if s["name"].endswith("/Complete") and "." in s["attributes"]["costmesh.experiment"]
    )  # fmt: skip
    # Each ablation run is traced under its own experiment; without the cache, no look-up.
    assert ablated["no-cache", "CACHE_OUTCOME_BYPASS"] == len(workload)
    assert ablated.total() == 2 * len(workload)


async def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = await asyncio.to_thread(main, list(argv))
    return code, out.getvalue(), err.getvalue()


def _replay_args(mesh: Mesh, path: Path, *more: str) -> list[str]:
    return ["replay", str(path), "--addr", mesh.address, "--key", "cm-demo-admin-key", *more]


async def test_each_experiment_has_its_own_cache(mesh: Mesh) -> None:
    workload = _workload(40, distinct=10)
    hits = []
    for experiment in ("exp-first", "exp-second"):
        planned = replay.plan(workload, "both", 0.5, seed=0)
        outcome = await _replay(mesh, planned, experiment)
        rows = await replay.ledger_rows(mesh.channel, AUTH, experiment, outcome.answered)
        treatment = build_report(rows, requests_per_day=1).total.treatment
        assert treatment is not None
        hits.append(treatment.cache_hits)
    # The second replay is not warmed by the first: 15 repeats hit in each.
    assert hits == [15, 15]


async def test_a_used_experiment_name_is_refused_before_anything_is_sent(
    mesh: Mesh, simulator: OpenAISimulator, tmp_path: Path
) -> None:
    path = tmp_path / "w.jsonl"
    write_workload(path, _workload(6, distinct=6))
    args = _replay_args(mesh, path, "--experiment", "taken", "--requests-per-day", "10")
    assert (await _cli(*args))[0] == 0
    calls = simulator.call_count

    code, _out, err = await _cli(*args)

    assert code == 2
    assert err == (
        "costmesh: experiment taken already has 12 rows in the ledger; choose another name\n"
    )
    assert simulator.call_count == calls


async def test_a_refused_key_stops_before_anything_is_sent(
    mesh: Mesh, simulator: OpenAISimulator, tmp_path: Path
) -> None:
    path = tmp_path / "w.jsonl"
    write_workload(path, _workload(6, distinct=6))
    args = ["replay", str(path), "--addr", mesh.address, "--key", "cm-wrong",
            "--requests-per-day", "10"]  # fmt: skip

    code, _, err = await _cli(*args)

    assert code == 1
    assert err.startswith("costmesh: UNAUTHENTICATED")
    assert err.count("\n") == 1
    assert simulator.call_count == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experiment", "x" * 101], "--experiment: at most 100 characters"),
        (["--experiment", "x" * 95, "--ablate"],
         "--experiment: at most 89 characters with --ablate (its runs add .no-cache, "
         ".no-routing to the name)"),
        (["--mode", "split", "--ablate"], "--ablate: needs --mode both"),
        (["--experiment", "a\tb"], "--experiment: printable characters only"),
        (["--requests-per-day", "abc"], "argument --requests-per-day: not a number: 'abc'"),
        (["--requests-per-day", "-5"], "argument --requests-per-day: must be above 0: '-5'"),
        ([], "less than an hour: too short to project a daily volume from; give "
             "--requests-per-day"),
    ],
)  # fmt: skip
async def test_bad_replay_options_exit_2_with_one_line_and_send_nothing(
    mesh: Mesh, simulator: OpenAISimulator, tmp_path: Path, argv: list[str], message: str
) -> None:
    path = tmp_path / "w.jsonl"
    write_workload(path, _workload(6, distinct=6))  # 150 s of traffic

    code, _, err = await _cli(*_replay_args(mesh, path, *argv))

    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert simulator.call_count == 0


def test_the_workload_s_own_volume_is_its_requests_over_its_span() -> None:
    hourly = [
        WorkloadRequest(
            id=f"r{i}", timestamp=T0 + timedelta(minutes=20 * i), team="t", feature="f",
            messages=(Message("user", "hi"),),
        )
        for i in range(7)
    ]  # fmt: skip
    # Seven requests over two hours: 84 a day (not clamped to one day's worth).
    assert replay.requests_per_day(hourly) == 84
    assert replay.volume_basis(hourly) == ("the workload's own volume: 7 requests over 2.00 hours")
    with pytest.raises(ValueError, match="less than an hour"):
        replay.requests_per_day(hourly[:3])


async def test_speed_sends_at_the_recorded_pace_in_timestamp_order(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    workload = [
        WorkloadRequest(
            id=f"s{i}", timestamp=T0 + timedelta(seconds=10 * i), team="t", feature="labels",
            messages=(Message("user", f"paced {i}"),),
        )
        for i in (2, 0, 1)  # not in time order: the schedule puts them in it
    ]  # fmt: skip
    planned = replay.plan(workload, "split", 0.5, seed=0)

    outcome = await replay.send_all(
        mesh.channel, AUTH, planned, "paced", concurrency=8, speed=100, progress=lambda *_: None
    )

    assert outcome.answered == 3
    assert outcome.seconds >= 0.2  # 20 s of traffic at 100 times its pace
    asked = [r["messages"][-1]["content"] for r in simulator.requests]
    assert asked == ["paced 0", "paced 1", "paced 2"]


async def test_a_call_that_raises_is_a_failure_not_the_end_of_the_replay(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = arms.complete_request

    def broken(
        request: WorkloadRequest, experiment: str, arm: types_pb2.Arm.ValueType
    ) -> inference_pb2.CompleteRequest:
        if request.id == "w1":
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        return real(request, experiment, arm)

    monkeypatch.setattr(arms, "complete_request", broken)
    outcome = await _replay(mesh, replay.plan(_workload(4, 4), "split", 0.5, 0), "raises")

    assert outcome.answered == 3
    assert outcome.failures == Counter({"UnicodeEncodeError": 1})


async def test_the_ledger_wait_includes_the_replies_cost(mesh: Mesh) -> None:
    planned = replay.plan(_workload(4, 4), "both", 0.5, seed=0)
    outcome = await _replay(mesh, planned, "costed")
    assert outcome.confirmed_cost_nano_usd > 0
    rows = await replay.ledger_rows(
        mesh.channel, AUTH, "costed", 8, cost_nano_usd=outcome.confirmed_cost_nano_usd
    )
    assert sum(r.cost_nano_usd for r in rows) == outcome.confirmed_cost_nano_usd

    with pytest.raises(TimeoutError, match="nano-USD"):  # a cost row still missing
        await replay.ledger_rows(
            mesh.channel, AUTH, "costed", 8, wait_seconds=0.3,
            cost_nano_usd=outcome.confirmed_cost_nano_usd + 1,
        )  # fmt: skip


async def test_failures_are_counted_after_the_report(
    mesh: Mesh, simulator: OpenAISimulator, tmp_path: Path
) -> None:
    path = tmp_path / "w.jsonl"
    write_workload(path, _workload(6, distinct=6))
    simulator.fail_next(1, status=400)

    code, out, _ = await _cli(
        *_replay_args(mesh, path, "--requests-per-day", "10", "--concurrency", "1")
    )

    assert code == 0
    tail = out[out.index("12 calls sent") :]
    assert tail.startswith("12 calls sent, 11 answered, 1 failed (1 ")
    assert "the arms are compared over answered calls only" in tail
    assert "1 requests were answered in one arm only" in tail


async def test_ledger_report_of_a_replay_needs_a_daily_volume(mesh: Mesh, tmp_path: Path) -> None:
    planned = replay.plan(_workload(4, 4), "both", 0.5, seed=0)
    outcome = await _replay(mesh, planned, "compressed")
    await replay.ledger_rows(mesh.channel, AUTH, "compressed", outcome.answered)
    report = ["ledger", "report", "--addr", mesh.address, "--key", "cm-demo-admin-key",
              "--experiment", "compressed"]  # fmt: skip

    code, _, err = await _cli(*report)
    assert code == 2
    assert "compressed in time" in err
    assert "--requests-per-day" in err

    code, out, _ = await _cli(*report, "--requests-per-day", "1000")
    assert code == 0
    assert "1,000 requests a day" in out
    code, _, err = await _cli(*report, "--requests-per-day", "abc")
    assert code == 2
    assert "argument --requests-per-day: not a number" in err
