"""The seed write-up's figures are the test cases of the economics commands."""

from __future__ import annotations

from decimal import Decimal

import pytest

from costmesh_tools.cli import main
from costmesh_tools.ledger.economics import fine_tune, self_host

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
    assert round(verdict.breakeven_requests_per_second, 2) == Decimal("2.31")


def test_more_load_than_one_gpu_serves_needs_more_gpus() -> None:
    assert self_host(A100, Decimal(40), Decimal(100), PER_REQUEST).gpus == 3


def test_fine_tuning_pays_back_from_the_daily_saving() -> None:
    verdict = fine_tune(Decimal(5000), Decimal("0.001"), Decimal(50_000))

    assert verdict.payback_days == Decimal(100)
    assert verdict.saving_usd_per_month == Decimal(1500)
    assert fine_tune(Decimal(5000), Decimal(0), Decimal(50_000)).payback_days is None


def test_the_command_prints_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(
        ["economics", "self-host", "--gpu-usd-per-hour", "2.50", "--gpu-requests-per-second",
         "40", "--requests-per-second", "30", "--api-usd-per-request", "0.0003"]
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
