"""`costmesh cache eval` against a real in-process cache, on a small labelled set."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from costmesh_tools.cache.evaluate import (
    FillRun,
    LabelledSet,
    Observation,
    is_false,
    new_namespace,
    open_cache,
    recommend,
    run_fill,
    run_stream,
    score,
    sweep,
)
from costmesh_tools.cache.intents import OOS, Example
from costmesh_tools.cli import main

STORED = (
    Example("How can I reset my password?", "password_reset"),
    Example("I forgot my password, what should I do?", "password_reset"),
    Example("What time do you open in the morning?", "opening_hours"),
    Example("When does the shop close tonight?", "opening_hours"),
    Example("Can I get a refund for my order?", "refund_policy"),
    Example("How do refunds work?", "refund_policy"),
    Example("How long does delivery take?", "delivery_time"),
    Example("When will my parcel arrive?", "delivery_time"),
    Example("What is the fee for an international transfer?", "transfer_fee"),
    Example("How do I cancel my subscription?", "cancel_subscription"),
    Example("How do I change my delivery address?", "change_address"),
)
PARAPHRASE = Example("How do I reset my password?", "password_reset")
# Worded like the transfer-fee question, but asks about another fee.
NEAR_DUPLICATE = Example("What is the fee for an international card payment?", "card_fee")
NEGATED = Example("Why can't I get a refund for my order?", "refund_refused")
OUT_OF_SCOPE = Example("what is the weather like on the moon", OOS)
QUERIES = (
    PARAPHRASE,
    NEAR_DUPLICATE,
    NEGATED,
    OUT_OF_SCOPE,
    Example("what time do you open?", "opening_hours"),
    Example("how long will shipping take", "delivery_time"),
    Example("I want to stop my subscription", "cancel_subscription"),
    Example("Could I have my money back for this order?", "refund_policy"),
)
THRESHOLDS = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)


@pytest.fixture
async def fill() -> AsyncIterator[FillRun]:
    async with open_cache("", "", concurrency=8) as client:
        yield await run_fill(client, LabelledSet("small", STORED, QUERIES), new_namespace())


def _observed(run: FillRun, query: Example) -> Observation:
    return next(o for o in run.observations if o.query == query)


async def test_hit_rate_never_rises_with_the_threshold(fill: FillRun) -> None:
    rows = sweep(fill.observations, THRESHOLDS)
    rates = [r.hit_rate for r in rows]

    assert fill.stored == len(STORED)
    assert rates == sorted(rates, reverse=True)
    assert rates[0] > rates[-1] == 0.0  # nothing is an exact repeat


async def test_a_paraphrase_is_a_hit_with_its_own_label(fill: FillRun) -> None:
    seen = _observed(fill, PARAPHRASE)

    assert seen.served is not None
    assert seen.served.question == "How can I reset my password?"
    assert seen.served.label == "password_reset"
    assert seen.served.similarity >= 0.9
    assert not is_false(PARAPHRASE, seen.served)


async def test_an_answer_to_another_label_counts_as_a_false_hit(fill: FillRun) -> None:
    seen = _observed(fill, NEAR_DUPLICATE)
    assert seen.served is not None
    similarity = seen.served.similarity

    below, above = score([seen], similarity), score([seen], min(similarity + 0.01, 1.0))

    assert seen.served.label == "transfer_fee"
    assert (below.hits, below.false_hits, below.false_hit_rate) == (1, 1, 1.0)
    assert (above.hits, above.false_hits) == (0, 0)


async def test_every_hit_on_an_out_of_scope_query_is_false(fill: FillRun) -> None:
    row = score(fill.observations, 0.0)

    assert (row.oos_queries, row.oos_hits, row.oos_hit_rate) == (1, 1, 1.0)
    assert row.false_hits >= 2  # the near duplicate and the out-of-scope query


async def test_the_guard_refusal_is_named_and_counted_as_a_prevented_false_hit(
    fill: FillRun,
) -> None:
    seen = _observed(fill, NEGATED)
    row = score(fill.observations, 0.5)

    # The guard passed the nearest over; at 0 the next one is served, far below 0.5.
    assert seen.served is None or seen.served.similarity < 0.5
    assert seen.rejection == "polarity"
    assert seen.refused is not None
    assert (seen.refused.question, seen.refused.label) == (
        "Can I get a refund for my order?",
        "refund_policy",
    )
    assert row.refused >= 1
    assert row.prevented >= 1


async def test_the_recommendation_is_the_lowest_threshold_within_the_limit(
    fill: FillRun,
) -> None:
    rows = sweep(fill.observations, THRESHOLDS)
    for limit in (0.0, 0.2, 0.5):
        best = recommend(rows, limit)
        assert best is not None  # 1.0 serves exact repeats only: no false hit
        assert best.precision_loss <= limit  # per served hit, not per query
        assert best.oos_hit_rate <= limit
        lower = [r for r in rows if r.threshold < best.threshold]
        assert all(r.precision_loss > limit or r.oos_hit_rate > limit for r in lower)


async def test_a_stream_stores_misses_and_counts_false_hits_on_them() -> None:
    stream = [
        Example("What is the fee for an international transfer?", "transfer_fee"),
        PARAPHRASE,
        Example("How can I reset my password?", "password_reset"),
        NEAR_DUPLICATE,
    ]
    async with open_cache("", "", concurrency=1) as client:
        run = await run_stream(client, stream, 0.7, new_namespace())
    row = score(run.observations, run.threshold)

    assert [o.served is not None for o in run.observations] == [False, False, True, True]
    assert run.stored == 2
    assert (row.hits, row.false_hits) == (2, 1)


def _jsonl(path: Path) -> Path:
    rows = [*STORED, *QUERIES] * 2  # repeats: some queries meet their own text
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in rows))
    return path


def test_the_cli_prints_the_sweep_and_a_recommendation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _jsonl(tmp_path / "small.jsonl")

    code = main(
        ["cache", "eval", "--mode", "fill", "--data", str(data), "--thresholds", "0.9,0.5,1"]
    )
    out = capsys.readouterr().out

    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("threshold"))
    assert "false-hit %" in header
    assert [line.split()[0] for line in lines[lines.index(header) + 1 :][:3]] == [
        "0.50",
        "0.90",
        "1.00",
    ]
    assert "lowest threshold within budget ON THIS SET (a diagnostic" in out


def test_the_cli_writes_csv_for_scripts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _jsonl(tmp_path / "small.jsonl")

    argv = ["cache", "eval", "--mode", "fill", "--data", str(data), "--thresholds", "0.9"]
    code = main([*argv, "--format", "csv"])
    out = capsys.readouterr().out.splitlines()

    assert code == 0
    assert out[0].startswith("threshold,hits,hit_rate,false_hits,false_hit_rate")
    assert len(out) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{tmp}/absent.jsonl"], "{tmp}/absent.jsonl: no such file"),
        (["--data", "banking77", "--data-dir", "{tmp}"], "{tmp}/banking77/train.csv: no such"),
        (["--data", "clinc150", "--data-dir", "{tmp}"], "{tmp}/clinc150/data_full.json: no such"),
    ],
    ids=["file", "banking77", "clinc150"],
)
def test_missing_data_is_one_clear_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code = main(["cache", "eval", "--mode", "fill", *(a.format(tmp=tmp_path) for a in args)])
    err = capsys.readouterr().err

    assert code == 2
    assert err.startswith(f"costmesh: {message.format(tmp=tmp_path)}")
    assert err.count("\n") == 1


async def test_a_stream_that_reports_its_false_hits_stops_repeating_them() -> None:
    # The same look-alike asked again and again at a threshold that lets it through.
    stream = [
        Example("What is the fee for an international transfer?", "transfer_fee"),
        *[NEAR_DUPLICATE] * 3,
    ]
    async with open_cache("", "", concurrency=1) as client:
        silent = await run_stream(client, stream, 0.3, new_namespace())
        reported = await run_stream(client, stream, 0.3, new_namespace(), report=True)

    assert score(silent.observations, 0.3).false_hits == 3
    # The first false hit is reported: its entry goes, the bar rises above it, and
    # the look-alike is stored as a question of its own; later asks hit it exactly.
    assert score(reported.observations, 0.3).false_hits == 1
    assert reported.reports == 1
    assert silent.reports == -1


def test_compare_mode_puts_a_model_at_its_validated_operating_point(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tiny = Path(__file__).parent / "data" / "tiny-intents.jsonl"

    code = main(["cache", "eval", "--models", "minilm", "--data", str(tiny)])
    out = capsys.readouterr().out

    assert code == 0
    assert "thresholds chosen on validation splits" in out
    row = next(line for line in out.splitlines() if line.lstrip().startswith("in-domain"))
    # Six validation questions cannot show 1% false hits per hit: nothing qualifies.
    assert row.split()[2:4] == ["minilm", "none"]
    assert "precision (1 - false hits per served hit) against hit ratio" in out


def test_compare_can_calibrate_every_model_on_your_own_labelled_questions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tiny = Path(__file__).parent / "data" / "tiny-intents.jsonl"
    argv = ["cache", "eval", "--models", "shipped", "--data", str(tiny),
            "--target-false-hit-rate", "0.5"]  # fmt: skip

    assert main(argv) == 0
    carded = capsys.readouterr().out
    assert main([*argv, "--calibrate-on-data"]) == 0
    own = capsys.readouterr().out

    # The shipped model was not trained on these questions: without the option it is
    # not measured on them at all; with it, at the threshold their validation allows.
    assert not any(line.lstrip().startswith("in-domain") for line in carded.splitlines())
    row = next(line for line in own.splitlines() if line.lstrip().startswith("own calibration"))
    model, threshold, queries, hits = row.split()[3:7]
    assert model == "shipped"
    assert 0 < float(threshold) < 1
    assert int(queries) > 0
    assert int(hits) > 0
