"""The seed write-up's figures are the test cases of the economics commands."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

import pytest

from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh_tools.cli import main
from costmesh_tools.ledger.economics import fine_tune, ledger_load, self_host
from tests.ledger.conftest import ADMIN_KEY, NOON, record_all, stamp, usage_record

A100 = Decimal("2.50")
PER_REQUEST = Decimal("0.0003")  # $23,328 a month at 30 requests a second


def test_an_a100_at_30_requests_a_second_is_13_times_cheaper_than_the_api() -> None:
    verdict = self_host(A100, Decimal(40), Decimal(30), PER_REQUEST)

    assert verdict.self_host_usd_per_month == Decimal(1800)
    assert verdict.api_usd_per_month == Decimal(23328)
    assert round(verdict.api_over_self_host, 1) == Decimal("13.0")
    assert verdict.gpus == 1
    assert verdict.utilisation == Decimal("0.75")


def test_at_one_request_a_second_the_api_wins() -> None:
    verdict = self_host(A100, Decimal(40), Decimal(1), PER_REQUEST)

    assert verdict.api_usd_per_month == Decimal("777.6")
    assert verdict.api_over_self_host < 1
    assert verdict.breakeven_requests_per_second is not None
    assert round(verdict.breakeven_requests_per_second, 2) == Decimal("2.31")


def test_more_load_than_one_gpu_serves_needs_more_gpus() -> None:
    assert self_host(A100, Decimal(40), Decimal(100), PER_REQUEST).gpus == 3


def test_the_breakeven_is_that_of_the_gpus_the_load_needs_with_spares_and_operations() -> None:
    one = self_host(A100, Decimal(40), Decimal(1), PER_REQUEST)
    verdict = self_host(
        A100, Decimal(40), Decimal(30), PER_REQUEST,
        peak_requests_per_second=Decimal(100), spare_gpus=1, ops_usd_per_month=Decimal(9000),
    )  # fmt: skip

    assert (verdict.serving_gpus, verdict.gpus) == (3, 4)  # the peak's three, N+1
    assert verdict.self_host_usd_per_month == 4 * Decimal(1800) + 9000
    # Breakeven with the sizing: at a peak 3.33x the mean, a GPU serves 12 requests a
    # second on average. One GPU (+1 spare, + $9,000) would need 16.2/s of API traffic
    # to break even, past its 12; two (+1) break even at 18.5/s, within their 24.
    assert verdict.breakeven_gpus == 3
    assert verdict.breakeven_requests_per_second is not None
    assert round(verdict.breakeven_requests_per_second, 9) == round(
        (3 * Decimal(1800) + 9000) / (Decimal(2592000) * PER_REQUEST), 9
    )
    assert one.breakeven_gpus == 1  # the seed's figure is unchanged: 2.31/s on one GPU
    assert verdict.utilisation == Decimal(30) / 160


def test_the_ledger_load_prices_a_request_and_finds_the_peak_minute() -> None:
    minute = 60_000_000
    # Ten minutes: one answer a minute, but 120 in the sixth (2 a second).
    times = [i * minute for i in range(10) if i != 5] + [5 * minute + i for i in range(120)]

    load = ledger_load(times, 129 * 300_000, 0, 10 * minute, Decimal(99))

    assert load.requests == 129
    assert load.api_usd_per_request == Decimal("0.0003")
    assert load.requests_per_second == Decimal(129) / 600
    assert load.peak_requests_per_second == 2
    median = ledger_load(times, 1, 0, 10 * minute, Decimal(50)).peak_requests_per_second
    assert median == load.requests_per_second  # a quiet median minute: never below the mean


def test_when_a_gpu_s_traffic_costs_the_api_less_than_the_gpu_there_is_no_breakeven(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cheap_api = self_host(A100, Decimal(40), Decimal(30), Decimal("0.00000001"))
    assert cheap_api.breakeven_requests_per_second is None
    assert main(["economics", "self-host", "--gpu-usd-per-hour", "2.50",
                 "--gpu-requests-per-second", "40", "--requests-per-second", "0",
                 "--api-usd-per-request", "0.0003"]) == 0  # fmt: skip
    assert "the API costs nothing at no load" in capsys.readouterr().out


def test_flags_that_do_not_go_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    gpu = [
        "economics",
        "self-host",
        "--gpu-usd-per-hour",
        "2.50",
        "--gpu-requests-per-second",
        "40",
    ]
    assert main([*gpu, "--from-ledger", "--requests-per-second", "3"]) == 2
    assert "--requests-per-second: the ledger gives it" in capsys.readouterr().err
    assert (
        main([*gpu, "--requests-per-second", "3", "--api-usd-per-request", "1", "--feature", "x"])
        == 2
    )
    assert "--feature: it reads the ledger" in capsys.readouterr().err


def test_fine_tuning_pays_back_from_the_daily_saving() -> None:
    verdict = fine_tune(Decimal(5000), Decimal("0.001"), Decimal(50_000))

    assert verdict.payback_days == Decimal(100)
    assert verdict.saving_usd_per_month == Decimal(1500)
    assert fine_tune(Decimal(5000), Decimal(0), Decimal(50_000)).payback_days is None


def test_the_command_prints_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(
        ["economics", "self-host", "--gpu-usd-per-hour", "2.50", "--gpu-requests-per-second",
         "40", "--requests-per-second", "30", "--api-usd-per-request", "0.0003",
         "--spare-gpus", "0"]  # the seed's figures: one GPU, no spare, no operations cost
    ) == 0  # fmt: skip
    out = capsys.readouterr().out

    assert "self-hosting: $1,800.00 a month" in out
    assert "API: $23,328.00 a month" in out
    assert "13.0x" in out


def test_bad_numbers_are_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["economics", "fine-tune", "--training-usd", "x", "--saving-usd-per-request",
                 "0.001", "--requests-per-day", "10"])  # fmt: skip

    assert code == 2
    assert "--training-usd" in capsys.readouterr().err


async def test_the_ledger_gives_the_price_and_the_load(
    ledger_server: tuple[ledger_pb2_grpc.LedgerServiceAsyncStub, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    stub, address = ledger_server
    rows = [usage_record(f"r{i}", time=stamp(NOON + timedelta(seconds=i))) for i in range(30)]
    rows.append(  # paid on the way: in the price, not a request
        usage_record("e1", time=stamp(NOON), purpose=ledger_pb2.CALL_PURPOSE_CACHE_EMBEDDING)
    )
    rows.append(usage_record("other", feature="search", time=stamp(NOON)))
    await record_all(stub, *rows)
    day = NOON.date().isoformat()
    argv = ["economics", "self-host", "--from-ledger", "--addr", address, "--key", ADMIN_KEY,
            "--from", day, "--to", day, "--feature", "tickets", "--gpu-usd-per-hour", "2.50",
            "--gpu-requests-per-second", "40", "--ops-usd-per-month", "4000",
            "--peak-percentile", "100"]  # fmt: skip

    code = await asyncio.to_thread(main, argv)

    out, err = capsys.readouterr()
    assert err == ""
    # 31 rows of 1,000 + 100 tokens on gpt-4o-mini ($0.00021 each) over 30 answers.
    assert code == 0
    assert "30 requests cost $0.006510 over 24.0 hours: $0.000217 a request" in out
    assert "0.500 at the 100th percentile minute" in out  # 30 answers in one minute
    assert "self-hosting: $7,600.00 a month (1 GPU for the peak + 1 spare" in out
