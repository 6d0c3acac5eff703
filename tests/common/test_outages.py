"""A dependency outage is logged when it starts, as a periodic reminder, and when it ends."""

from __future__ import annotations

import logging

import pytest

from services.common.outages import OutageLog
from tests.clock import Clock


def test_a_burst_of_failures_logs_once_then_reminds_then_reports_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    outage = OutageLog(logging.getLogger("test.outage"), "ledger", every_seconds=60, clock=clock)
    caplog.set_level(logging.INFO, logger="test.outage")

    for _ in range(500):
        outage.failed("UNAVAILABLE")
        clock.now += 0.01
    clock.now += 60
    outage.failed("UNAVAILABLE")
    outage.succeeded()
    outage.succeeded()

    assert [r.getMessage() for r in caplog.records] == [
        "ledger failing (UNAVAILABLE); 1 failures so far",
        "ledger failing (UNAVAILABLE); 501 failures so far",
        "ledger recovered after 501 failures",
    ]
