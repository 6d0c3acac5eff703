"""What an SRE scrapes: the mesh's metrics at /metrics, in Prometheus's format."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from costmesh_simulator import OpenAISimulator
from tests.conftest import AUTH, DEMO_KEY, Mesh, running_mesh, user_request

# A feature of this test's own: the session's meter provider is shared by every test.
CONFIG = """
[features.metered]
router = "rules"
tier = "simple"

[teams.demo]
daily_usd = "10"
"""


@pytest.fixture
async def mesh(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(simulator, tmp_path, CONFIG, http=True) as running:
        yield running


async def scrape(mesh: Mesh) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"http://127.0.0.1:{mesh.running.http_port}/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    """The sum of `name`'s samples that carry every one of `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


async def test_calls_costs_tokens_and_cache_outcomes_are_counted(mesh: Mesh) -> None:
    before = await scrape(mesh)
    async with AsyncOpenAI(
        base_url=f"http://127.0.0.1:{mesh.running.http_port}/v1", api_key=DEMO_KEY, max_retries=0
    ) as sdk:
        for _ in range(2):  # a miss, then an exact hit
            await sdk.chat.completions.create(
                model="auto",
                messages=[{"role": "user", "content": "Do you ship to Norway?"}],
                extra_headers={"x-costmesh-feature": "metered"},
            )
    await mesh.inference.Complete(user_request("Do you ship to Norway?", "metered"),
                                  metadata=AUTH, timeout=10)  # fmt: skip
    after = await scrape(mesh)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    mine = {"costmesh_feature": "metered", "costmesh_team": "demo"}
    assert added("costmesh_requests_total", costmesh_cache_outcome="miss", **mine) == 1
    assert added("costmesh_requests_total", costmesh_cache_outcome="exact", **mine) == 2
    assert added("costmesh_cost_nano_usd_total", gen_ai_request_model="gpt-4o-mini", **mine) > 0
    assert added("costmesh_cost_baseline_nano_usd_total", **mine) > added(
        "costmesh_cost_nano_usd_total", **mine
    )
    assert added("gen_ai_client_token_usage_count", gen_ai_token_type="input",
                 gen_ai_request_model="gpt-4o-mini") == 1  # fmt: skip
    assert added("gen_ai_client_operation_duration_seconds_count",
                 gen_ai_provider_name="openai") == 1  # fmt: skip
    complete = {"rpc_service": "costmesh.inference.v1.InferenceService", "rpc_method": "Complete"}
    assert added("rpc_server_duration_seconds_count", rpc_grpc_status_code="0", **complete) == 3


async def test_errors_are_counted_by_status(mesh: Mesh) -> None:
    before = await scrape(mesh)
    with pytest.raises(Exception, match="unknown feature"):
        await mesh.inference.Complete(user_request("hello", "no-such-feature"),
                                      metadata=AUTH, timeout=10)  # fmt: skip
    after = await scrape(mesh)
    invalid = {"rpc_method": "Complete", "rpc_grpc_status_code": "3"}  # INVALID_ARGUMENT
    name = "rpc_server_duration_seconds_count"
    assert value(after, name, **invalid) - value(before, name, **invalid) == 1


async def test_budget_use_and_the_outbox_backlog_are_gauges(mesh: Mesh) -> None:
    await mesh.inference.Complete(user_request("Is there a student discount?", "metered"),
                                  metadata=AUTH, timeout=10)  # fmt: skip
    await mesh.running.settled()
    scraped = await scrape(mesh)

    used = value(scraped, "costmesh_budget_used", costmesh_team="demo",
                 costmesh_budget_period="daily")  # fmt: skip
    assert 0 < used < 0.001  # a fraction of a cent of ten dollars
    assert ("costmesh_outbox_pending", frozenset()) in {
        (name, frozenset(k for k in labels if not k[0].startswith("otel_")))
        for name, labels in scraped
    }
    assert value(scraped, "costmesh_outbox_pending") == 0  # settled: the ledger has it all
