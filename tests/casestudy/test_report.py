"""The savings report: numbers from hand-built ledger rows, and its three renderings."""

from __future__ import annotations

import csv
import io
import random
import re
from decimal import Decimal
from pathlib import Path

import pytest

from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from costmesh_tools.casestudy.quality import Truth
from costmesh_tools.casestudy.report import (
    SIMULATED_NOTICE,
    ArmStats,
    EmptyReportError,
    SavingsReport,
    build_report,
)
from costmesh_tools.casestudy.report_charts import AFTER, BEFORE, CACHE_COLOUR
from costmesh_tools.casestudy.report_render import (
    CSV_HEADER,
    WIDTH,
    render_csv,
    render_html,
    render_terminal,
)
from tests.browser import artifacts_dir, visit
from tests.png import read_png

CONTROL, TREATMENT = types_pb2.ARM_CONTROL, types_pb2.ARM_TREATMENT
ANSWER = ledger_pb2.CALL_PURPOSE_ANSWER
MISS = types_pb2.CACHE_OUTCOME_MISS
EXACT, SEMANTIC = types_pb2.CACHE_OUTCOME_EXACT, types_pb2.CACHE_OUTCOME_SEMANTIC
TIERS = {"gpt-4o": "complex", "gpt-4o-mini": "simple", "text-embedding-3-small": "simple"}
T0 = 1_800_000_000  # seconds since the epoch, a Friday in 2027


def row(
    client_id: str,
    arm: types_pb2.Arm.ValueType,
    *,
    feature: str = "support",
    purpose: ledger_pb2.CallPurpose.ValueType = ANSWER,
    model: str = "",
    outcome: types_pb2.CacheOutcome.ValueType = MISS,
    tokens: tuple[int, int] = (0, 0),
    cost: int = 0,
    latency: int = 0,
    escalated: bool = False,
    source: str = "",
    seconds: int = 0,
) -> ledger_pb2.UsageRecord:
    record = ledger_pb2.UsageRecord(
        request_id=f"{client_id}/{arm}/{purpose}/{model}",
        client_request_id=client_id,
        experiment="case-study",
        arm=arm,
        feature=feature,
        purpose=purpose,
        model=model,
        cache_outcome=outcome,
        usage=types_pb2.TokenUsage(input_tokens=tokens[0], output_tokens=tokens[1]),
        cost_nano_usd=cost,
        latency_ms=latency,
        escalated=escalated,
        cache_source_request_id=source,
    )
    record.time.FromSeconds(T0 + seconds)
    return record


# Four support requests through both arms. Costs are gpt-4o's and gpt-4o-mini's prices
# (2,500 / 10,000 and 150 / 600 nano-USD a token, input / output).
TRUTH = {
    "r1": Truth(label="refund", tier="complex"),
    "r2": Truth(label="refund", tier="simple"),
    "r3": Truth(label="password", tier="complex"),
    "r4": Truth(label="shipping", tier="TIER_COMPLEX"),
}
CONTROL_ROWS = [
    row("r1", CONTROL, model="gpt-4o", tokens=(1000, 200), cost=4_500_000, latency=900),
    row("r2", CONTROL, model="gpt-4o", tokens=(800, 100), cost=3_000_000, latency=700),
    row("r3", CONTROL, model="gpt-4o", tokens=(600, 300), cost=4_500_000, latency=1100),
    row("r4", CONTROL, model="gpt-4o", tokens=(400, 100), cost=2_000_000, latency=500),
]
EMBEDDING = ledger_pb2.CALL_PURPOSE_CACHE_EMBEDDING
TREATMENT_ROWS = [
    # r1: a miss, routed to the small model (though truly complex); embedded and routed.
    row("r1", TREATMENT, model="gpt-4o-mini", tokens=(1000, 200), cost=270_000, latency=400),
    row("r1", TREATMENT, purpose=EMBEDDING, model="text-embedding-3-small", tokens=(10, 0),
        cost=200),
    row("r1", TREATMENT, purpose=ledger_pb2.CALL_PURPOSE_ROUTING, model="gpt-4o-mini",
        tokens=(50, 1), cost=8_100),
    # r2: a semantic hit on r1's answer, same label; r3: an exact hit on it, another label.
    row("r2", TREATMENT, outcome=SEMANTIC, source="r1", latency=20),
    row("r2", TREATMENT, purpose=EMBEDDING, model="text-embedding-3-small", tokens=(10, 0),
        cost=200),
    row("r3", TREATMENT, outcome=EXACT, source="r1", latency=10),
    # r4: the small model was not confident; gpt-4o answered instead.
    row("r4", TREATMENT, purpose=ledger_pb2.CALL_PURPOSE_ESCALATED_ATTEMPT, model="gpt-4o-mini",
        tokens=(400, 100), cost=120_000),
    row("r4", TREATMENT, model="gpt-4o", tokens=(400, 100), cost=2_000_000, latency=1500,
        escalated=True),
]  # fmt: skip
CONTROL_COST = 4_500_000 + 3_000_000 + 4_500_000 + 2_000_000  # 14,000,000
TREATMENT_OVERHEAD = 200 + 8_100 + 200 + 120_000  # 128,500
TREATMENT_COST = 270_000 + 2_000_000 + TREATMENT_OVERHEAD  # 2,398,500


def case_report(**options: object) -> SavingsReport:
    settings: dict[str, object] = {"truth": TRUTH, "model_tiers": TIERS, "requests_per_day": 1000}
    settings.update(options)
    return build_report(CONTROL_ROWS + TREATMENT_ROWS, **settings)  # type: ignore[arg-type]


def both_arms(report: SavingsReport) -> tuple[ArmStats, ArmStats]:
    control, treatment = report.total.control, report.total.treatment
    assert control is not None
    assert treatment is not None
    return control, treatment


def test_requests_are_answers_and_overhead_counts_towards_tokens_and_cost() -> None:
    report = case_report()
    control, treatment = both_arms(report)
    assert (control.requests, control.overhead_rows) == (4, 0)
    assert (treatment.requests, treatment.overhead_rows) == (4, 4)
    assert control.billed_tokens == 1200 + 900 + 900 + 500
    assert control.tokens_per_request == Decimal(875)
    assert treatment.billed_tokens == 1200 + 10 + 51 + 10 + 500 + 500
    assert treatment.tokens_per_request == Decimal("567.75")
    assert control.cost_nano_usd == CONTROL_COST == 14_000_000
    assert treatment.cost_nano_usd == TREATMENT_COST == 2_398_500
    assert treatment.overhead_cost_nano_usd == TREATMENT_OVERHEAD


def test_cache_hits_model_mix_and_latency() -> None:
    report = case_report()
    control, treatment = both_arms(report)
    assert (treatment.exact_hits, treatment.semantic_hits) == (1, 1)
    assert treatment.cache_hit_rate == Decimal("0.5")
    assert control.cache_hit_rate == 0
    assert control.model_mix == (("gpt-4o", 4),)
    assert treatment.model_mix == (("cache", 2), ("gpt-4o", 1), ("gpt-4o-mini", 1))
    assert treatment.share("cache") == Decimal("0.5")
    assert report.models == ("gpt-4o", "cache", "gpt-4o-mini")
    # Nearest rank: p50 of four is the 2nd value, p95 the 4th.
    assert (control.latency.mean_ms, control.latency.p50_ms, control.latency.p95_ms) == (
        Decimal(800), 700, 1100,
    )  # fmt: skip
    assert treatment.latency.mean_ms == Decimal("482.5")  # (10 + 20 + 400 + 1500) / 4
    assert (treatment.latency.p50_ms, treatment.latency.p95_ms) == (20, 1500)


def test_quality_proxies() -> None:
    report = case_report()
    control, treatment = both_arms(report)
    q = treatment.quality
    # r2 reused r1's answer with the same label; r3 with another: one false hit of two.
    assert (q.false_hits, q.judged_hits, q.false_hit_rate) == (1, 2, Decimal("0.5"))
    # Complex: r1 (small model), r3 (cache, counted apart), r4 (escalated to gpt-4o).
    assert (q.complex_requests, q.complex_on_small, q.complex_from_cache) == (3, 1, 1)
    assert q.complex_on_small_rate == Decimal("0.5")
    # One escalation among the two answers a provider gave.
    assert (q.escalated, q.provider_answers, q.escalation_rate) == (1, 2, Decimal("0.5"))
    assert (control.quality.complex_requests, control.quality.complex_on_small) == (3, 0)
    assert control.quality.false_hit_rate is None  # no hits to judge
    assert report.labels_known
    assert report.tiers_known


def test_without_truth_the_proxies_that_need_it_are_not_judged() -> None:
    report = case_report(truth=None)
    treatment = report.total.treatment
    assert treatment is not None
    assert (treatment.quality.judged_hits, treatment.quality.complex_requests) == (0, 0)
    assert not report.labels_known
    text = render_terminal(report)
    assert re.search(r"false cache hits\s+n/a\s+n/a", text)
    assert re.search(r"complex on a small model\s+n/a\s+n/a", text)


def test_savings_and_projection_arithmetic() -> None:
    report = case_report()
    control, treatment = both_arms(report)
    savings = report.total.savings
    assert savings is not None
    # 1,000 requests a day over 4 measured requests: each arm's cost times 250.
    assert control.daily_cost_nano_usd == 14_000_000 * 250 == 3_500_000_000
    assert control.monthly_cost_nano_usd == 3_500_000_000 * 30
    assert treatment.daily_cost_nano_usd == 2_398_500 * 250 == 599_625_000
    assert treatment.monthly_cost_nano_usd == 599_625_000 * 30 == 17_988_750_000
    assert savings.daily_nano_usd == 3_500_000_000 - 599_625_000
    assert savings.monthly_nano_usd == 105_000_000_000 - 17_988_750_000 == 87_011_250_000
    assert savings.fraction == 1 - Decimal(2_398_500) / Decimal(14_000_000)
    assert "saves $87.01 a month (82.9%): $105.00 before, $17.99 after" in render_terminal(report)


def test_a_treatment_that_costs_more_is_said_plainly() -> None:
    rows = [row("a", CONTROL, model="gpt-4o-mini", cost=1_000_000),
            row("a", TREATMENT, model="gpt-4o", cost=1_500_000)]  # fmt: skip
    report = build_report(rows, requests_per_day=100)
    assert report.total.savings is not None
    assert report.total.savings.fraction == Decimal("-0.5")
    assert report.total.savings.monthly_nano_usd == -1_500_000_000
    assert "costs $1.50 more a month (50.0%): $3.00 before, $4.50 after" in render_terminal(report)


def test_without_a_volume_the_projection_comes_from_the_time_the_rows_span() -> None:
    spread = [row("a", CONTROL, model="gpt-4o", cost=1_000, seconds=0),
              row("b", CONTROL, model="gpt-4o", cost=3_000, seconds=6 * 3600),
              row("a", TREATMENT, model="gpt-4o-mini", cost=100, seconds=3 * 3600),
              row("b", TREATMENT, model="gpt-4o-mini", cost=300, seconds=12 * 3600)]  # fmt: skip
    report = build_report(spread)
    # Four answers in twelve hours: eight a day; each arm's two requests scale by four.
    assert report.requests_per_day == 8
    assert report.total.control is not None
    assert report.total.control.daily_cost_nano_usd == 4_000 * 4
    assert report.total.control.monthly_cost_nano_usd == 4_000 * 4 * 30


def test_rows_that_span_no_time_give_no_projection() -> None:
    report = build_report(CONTROL_ROWS + TREATMENT_ROWS)  # every row at T0
    assert report.requests_per_day is None
    assert report.total.control is not None
    assert report.total.control.daily_cost_nano_usd is None
    assert report.total.savings is not None
    assert report.total.savings.monthly_nano_usd is None
    text = render_terminal(report)
    assert "(projected)" not in text
    assert "no projection" in text
    assert "cuts the cost per request by 82.9%" in text


def test_money_is_exact_to_the_nano_dollar() -> None:
    # 2**53 + 1 is the first integer a float cannot hold; a third of a dollar thrice.
    costs = [2**53 + 1, 333_333_333, 333_333_333, 333_333_333, 1]
    rows = [row(f"m{i}", CONTROL, model="gpt-4o", cost=c) for i, c in enumerate(costs)]
    rows.append(row("t", TREATMENT, model="gpt-4o-mini", cost=7))
    report = build_report(rows, requests_per_day=5)
    assert report.total.control is not None
    assert report.total.control.cost_nano_usd == sum(costs) == 9_007_200_254_740_993
    parsed = list(csv.DictReader(io.StringIO(render_csv(report))))
    control = next(r for r in parsed if r["scope"] == "total" and r["arm"] == "control")
    assert control["cost_usd"] == "9007200.254740993"
    assert Decimal(control["cost_usd"]) * 10**9 == sum(costs)
    assert control["daily_cost_usd"] == "9007200.254740993"  # five a day, five measured
    assert "$9,007,200.25" in render_terminal(report)


def test_an_arm_with_no_rows_for_a_feature_is_said_not_divided_by() -> None:
    search = [row("s1", TREATMENT, feature="search", model="gpt-4o-mini", cost=900)]
    report = build_report(CONTROL_ROWS + TREATMENT_ROWS + search, TRUTH, TIERS, 1000)
    by_name = {c.feature: c for c in report.features}
    assert by_name["search"].control is None
    assert by_name["search"].savings is None
    assert "search: no control answers" in report.notes
    text = render_terminal(report)
    assert re.search(r"requests\s+no answers\s+1\n", text)
    parsed = list(csv.DictReader(io.StringIO(render_csv(report))))
    missing = next(r for r in parsed if r["feature"] == "search" and r["arm"] == "control")
    assert (missing["requests"], missing["cost_usd"], missing["note"]) == ("0", "", "no answers")


def test_one_arm_only() -> None:
    report = build_report(CONTROL_ROWS, TRUTH, TIERS, 1000, simulated=True)
    assert report.total.treatment is None
    assert report.total.savings is None
    assert report.notes == ("only the control arm has answers: nothing to compare it with",)
    text = render_terminal(report)
    assert "No saving to show: only the control arm has answers." in text
    assert re.search(r"cost \(measured\)\s+\$0\.014000\s+no answers", text)
    parsed = list(csv.DictReader(io.StringIO(render_csv(report))))
    assert [(r["scope"], r["arm"], r["requests"]) for r in parsed] == [
        ("feature", "control", "4"),
        ("feature", "treatment", "0"),
        ("total", "control", "4"),
        ("total", "treatment", "0"),
    ]
    assert "no answers" in render_html(report)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "no ledger rows"),
        ([row("x", types_pb2.ARM_UNSPECIFIED, model="gpt-4o")], "control or treatment arm"),
        ([row("x", CONTROL, purpose=EMBEDDING, model="e")], "all overhead"),
    ],
)
def test_nothing_to_report_is_a_clear_error(
    rows: list[ledger_pb2.UsageRecord], message: str
) -> None:
    with pytest.raises(EmptyReportError, match=f"nothing to report: .*{message}"):
        build_report(rows)


def test_rows_outside_the_arms_are_left_out_and_said() -> None:
    stray = row("z", types_pb2.ARM_UNSPECIFIED, model="gpt-4o", cost=5)
    report = build_report([*CONTROL_ROWS, *TREATMENT_ROWS, stray], TRUTH, TIERS, 1000)
    assert report.total.control is not None
    assert report.total.control.cost_nano_usd == CONTROL_COST
    assert "1 rows outside the control and treatment arms were left out" in report.notes


def test_csv_parses_back_to_the_numbers() -> None:
    report = case_report()
    text = render_csv(report)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert tuple(next(csv.reader(io.StringIO(text)))) == CSV_HEADER
    assert [(r["scope"], r["feature"], r["arm"]) for r in parsed] == [
        ("feature", "support", "control"), ("feature", "support", "treatment"),
        ("total", "", "control"), ("total", "", "treatment"),
    ]  # fmt: skip
    after = parsed[3]
    assert after["requests"] == "4"
    assert after["billed_tokens"] == "2271"
    assert after["cost_usd"] == "0.002398500"
    assert after["overhead_cost_usd"] == "0.000128500"
    assert after["cache_hit_rate"] == "0.500000"
    assert after["model_mix"] == "cache=2;gpt-4o=1;gpt-4o-mini=1"
    assert after["monthly_cost_usd"] == "17.988750000"
    assert after["savings_monthly_usd"] == "87.011250000"
    assert Decimal(after["savings_fraction"]) == round(1 - Decimal(2_398_500) / 14_000_000, 6)
    assert (after["false_hits"], after["judged_hits"], after["complex_on_small"]) == ("1", "2", "1")
    assert (after["latency_p50_ms"], after["latency_p95_ms"]) == ("20", "1500")
    assert parsed[2]["savings_monthly_usd"] == ""  # savings go on the treatment row
    assert {r["simulated"] for r in parsed} == {"false"}


def _with_counterfactual(record: ledger_pb2.UsageRecord, cost: int) -> ledger_pb2.UsageRecord:
    record.counterfactual_cost_nano_usd = cost
    record.baseline_model = "gpt-4o"
    return record


def test_each_lever_s_saving_is_shown_and_they_sum_to_the_total() -> None:
    rows = [
        _with_counterfactual(row("a", CONTROL, model="gpt-4o", cost=1000), 1000),
        _with_counterfactual(row("a", TREATMENT, model="gpt-4o-mini", cost=60), 1000),
        _with_counterfactual(row("b", TREATMENT, outcome=EXACT, source="a"), 1000),
        _with_counterfactual(row("c", TREATMENT, outcome=SEMANTIC, source="a"), 1000),
        _with_counterfactual(row("d", TREATMENT, model="gpt-4o", cost=1000), 1000),
        row("a", TREATMENT, purpose=ledger_pb2.CALL_PURPOSE_ROUTING, model="gpt-4o-mini", cost=40),
        row("e", TREATMENT, purpose=ledger_pb2.CallPurpose.ValueType(99), model="x", cost=1),
    ]
    report = build_report(rows, requests_per_day=1000)
    assert report.total.treatment is not None

    assert report.total.treatment.levers == (
        ("cache: exact repeats", 1000),
        ("cache: rewordings (semantic)", 1000),
        ("routing to cheaper models", 940),
        ("answers on the baseline model", 0),
        ("routing calls to an LLM", -40),
        ("other overhead", -1),
    )
    terminal = render_terminal(report)
    assert "Where the treatment's saving comes from" in terminal
    total_line = next(x for x in terminal.splitlines() if x.strip().startswith("total"))
    assert "100.0%" in total_line
    assert "72.5%" in total_line  # 2,899 saved of 4,000 counterfactual nano-USD
    assert "Where the saving comes from" in render_html(report)
    treatment_csv = list(csv.DictReader(io.StringIO(render_csv(report))))[-1]
    assert treatment_csv["saved_by_lever_usd"].startswith("cache: exact repeats=0.000001000;")


def test_the_terminal_table_fits_and_says_when_the_provider_was_simulated() -> None:
    simulated = render_terminal(case_report(simulated=True))
    assert simulated.count("SIMULATED provider") == 2  # above and below the table
    assert all(len(line) <= WIDTH for line in simulated.splitlines())
    assert re.search(r"cost per month \(projected\)\s+\$105\.00\s+\$17\.99\s+-\$87\.01 \(-82\.9%\)",
                     simulated)  # fmt: skip
    assert re.search(r"cache hit rate\s+0\.0%\s+50\.0%\s+\+50\.0 pts", simulated)
    assert "SIMULATED" not in render_terminal(case_report())


def test_html_escapes_every_name_and_fetches_nothing() -> None:
    hostile = "<script>alert(1)</script>"
    rows = [row("h", arm, feature=hostile, model='gpt-"4o"&<b>', cost=10) for arm in
            (CONTROL, TREATMENT)]  # fmt: skip
    page = render_html(build_report(rows, requests_per_day=10, simulated=True))
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "gpt-&quot;4o&quot;&amp;&lt;b&gt;" in page
    assert SIMULATED_NOTICE in page
    for external in ("http:", "https:", "src=", "url(", "@import", "<link"):
        assert external not in page


# --- the page in a real browser ---------------------------------------------------------


def realistic_report() -> SavingsReport:
    """Three features, a thousand requests through each arm, with the case study's shape."""
    rng = random.Random(20261126)
    rows: list[ledger_pb2.UsageRecord] = []
    truth: dict[str, Truth] = {}
    for feature, count in (("support", 600), ("billing <disputes & refunds>", 250),
                           ("order-status", 150)):  # fmt: skip
        for i in range(count):
            client_id = f"{feature}-{i}"
            tier = rng.choices(("simple", "moderate", "complex"), (5, 3, 2))[0]
            truth[client_id] = Truth(rng.choice(("refund", "login", "shipping")), tier)
            rows += _arm_rows(rng, feature, client_id, tier, i)
    return build_report(rows, truth, TIERS, 50_000, simulated=True)


def _arm_rows(
    rng: random.Random, feature: str, client_id: str, tier: str, i: int
) -> list[ledger_pb2.UsageRecord]:
    """The control's gpt-4o answer, and the treatment's: a semantic hit on an earlier
    request, or a shorter answer from the routed model."""
    tokens = (rng.randint(300, 900), rng.randint(100, 400))
    control = row(client_id, CONTROL, feature=feature, model="gpt-4o", tokens=tokens,
                  cost=_price("gpt-4o", tokens), latency=rng.randint(600, 2400))  # fmt: skip
    if i > 10 and rng.random() < 0.34:
        source = f"{feature}-{rng.randrange(i)}"
        hit = row(client_id, TREATMENT, feature=feature, outcome=SEMANTIC, source=source,
                  latency=rng.randint(5, 40))  # fmt: skip
        return [control, hit]
    model = "gpt-4o" if tier == "complex" and rng.random() < 0.6 else "gpt-4o-mini"
    shorter = (tokens[0] * 6 // 10, tokens[1] * 6 // 10)
    answer = row(client_id, TREATMENT, feature=feature, model=model, tokens=shorter,
                 cost=_price(model, shorter), latency=rng.randint(300, 1500))  # fmt: skip
    return [control, answer]


def _price(model: str, tokens: tuple[int, int]) -> int:
    per_input, per_output = {"gpt-4o": (2500, 10_000), "gpt-4o-mini": (150, 600)}[model]
    return tokens[0] * per_input + tokens[1] * per_output


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def test_the_html_page_renders_in_headless_chromium() -> None:
    page = artifacts_dir() / "savings-report.html"
    page.write_text(render_html(realistic_report()), encoding="utf-8")

    dom = visit(page, "--dump-dom")
    assert dom.console == [], "the page logged to the console:\n" + "\n".join(dom.console)
    for chart in ("chart-cost", "chart-mix", "chart-cache"):
        assert re.search(rf'<svg id="{chart}"[^>]*role="img"', dom.output), chart
    assert dom.output.count("<rect") > 30  # the bars are in the rendered DOM
    assert "SIMULATED provider" in dom.output

    screenshot = artifacts_dir() / "savings-report.png"
    screenshot.unlink(missing_ok=True)
    shot = visit(page, f"--screenshot={screenshot}", "--window-size=1280,2000")
    assert shot.console == [], "\n".join(shot.console)
    image = read_png(screenshot.read_bytes())
    assert (image.width, image.height) == (1280, 2000)
    colours = image.colours(step=3)
    assert len(colours) > 50, "the screenshot is nearly blank"
    # The charts drew their bars: both arms' colours and the cache's are on screen, and
    # so is the simulated banner.
    wanted = {"control bar": BEFORE, "treatment bar": AFTER, "cache segment": CACHE_COLOUR,
              "simulated banner": "#fff4e5"}  # fmt: skip
    for name, colour in wanted.items():
        rgb = _rgb(colour)
        assert rgb in colours or (*rgb, 255) in colours, f"no {name} colour on the screenshot"


def test_the_console_check_catches_a_page_that_tries_to_fetch(tmp_path: Path) -> None:
    """The check above would pass on a Chromium that logs nothing: show that it logs."""
    page = tmp_path / "fetching.html"
    report_head = render_html(case_report()).split("<body>")[0]
    page.write_text(report_head + '<body><img src="http://example.invalid/x.png" alt="x">')
    assert any("Content Security Policy" in line for line in visit(page, "--dump-dom").console)
