"""Short cases of bench/faults.py: a split deployment under load survives a partition
between services, a killed Redis under the cache, a provider storm and a provider
outage, each with the conservation check (the full suite, with 100 SIGKILLs, is
`bench/faults.py all`; tests/inference/test_crash.py kills inference too)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "faults.py"


def _faults() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_faults", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


faults = _faults()
CLEAN = {"doubled": 0, "unbilled": 0, "orphans": 0, "replayed differently": 0, "cost mismatches": 0}


@pytest.mark.parametrize("fault", ["net-partition", "provider-storm", "redis-kill"])
async def test_a_fault_under_load_bills_every_answered_request_exactly_once(fault: str) -> None:
    if fault.startswith("redis") and shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed (the machine kind provides it)")
        pytest.skip("redis-server is not installed")

    figures = await faults.run_fault(fault, kills=0)

    assert {k: figures[k] for k in CLEAN} == CLEAN
    assert figures["answered"] > 50


async def test_calls_succeed_again_within_two_seconds_of_the_provider_coming_back() -> None:
    figures = await faults.run_fault("provider-outage", kills=0)

    assert {k: figures[k] for k in CLEAN} == CLEAN
    assert figures["client errors"] > 0, "the outage was felt"
    assert figures["errors after return (s)"] <= 2.0
