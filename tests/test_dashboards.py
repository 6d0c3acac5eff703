"""Every Grafana panel and Prometheus alert reads a metric the mesh really exports.

The mesh is driven through each thing the dashboard shows (a miss, a hit, an
escalation, a retry, a fallback, a cool-down, a refused call), then scraped; every
metric name in deploy/ must be among what was scraped."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from costmesh_simulator import OpenAISimulator
from tests.conftest import AUTH, Mesh, running_mesh, user_request

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CONFIG = """
[inference]
max_attempts = 2
retry_base_seconds = 0.01
retry_max_seconds = 0.02
cooldown_failures = 2

[providers.down]
base_url = "http://127.0.0.1:9/v1"
api_key_env = "OPENAI_API_KEY"

[models."gpt-4o-down"]
provider = "down"
context_window = 128000
input_usd_per_mtok = "2.50"
cached_input_usd_per_mtok = "1.25"
output_usd_per_mtok = "10.00"
fallbacks = ["gpt-4o-mini"]

[features.rated]
router = "rules"
tier = "simple"
escalation = "self_rating"
escalation_threshold = 0.7

[teams.demo]
daily_usd = "100"

[features.flaky]
router = "rules"
cache_mode = "off"
models.simple = "gpt-4o-down"
"""
_PROMQL_WORDS = {
    "sum", "rate", "increase", "histogram_quantile", "by", "without", "on", "ignoring",
    "avg", "max", "min", "count", "le", "and", "or", "unless", "bool",
}  # fmt: skip


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "costmesh.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_queries() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads: label matchers, grouping labels, ranges
    and numbers taken out, what remains that is not PromQL is a metric."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)", " ", expr)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
    return {w for w in words if w not in _PROMQL_WORDS and not re.fullmatch(r"e\d+", w)}


def test_the_query_reader_finds_metrics_and_skips_labels() -> None:
    expr = 'sum by (costmesh_team) (rate(costmesh_cost_nano_usd_total{a="b"}[5m])) / 1e9'
    assert metric_names(expr) == {"costmesh_cost_nano_usd_total"}


@pytest.fixture
async def mesh(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(simulator, tmp_path, CONFIG, http=True) as running:
        yield running


async def exported(mesh: Mesh) -> set[str]:
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"http://127.0.0.1:{mesh.running.http_port}/metrics")
    return {
        sample.name
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


async def test_every_panel_and_alert_reads_an_exported_metric(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.script("gpt-4o-mini", "Maybe at nine?\n[CONFIDENCE: 3]")
    await mesh.inference.Complete(
        user_request("When do you open?", "rated"), metadata=AUTH, timeout=10
    )  # fmt: skip  (escalated)
    await mesh.inference.Complete(
        user_request("When do you open?", "rated"), metadata=AUTH, timeout=10
    )  # fmt: skip  (an exact hit)
    simulator.fail_next(1, 503)
    await mesh.inference.Complete(
        user_request("Do you sell gift cards?"), metadata=AUTH, timeout=10
    )  # fmt: skip  (retried)
    await mesh.inference.Complete(
        user_request("Is there parking?", "flaky"), metadata=AUTH, timeout=10
    )  # fmt: skip  (cooled down, fell back)
    with pytest.raises(Exception, match="unknown feature"):
        await mesh.inference.Complete(user_request("x", "nope"), metadata=AUTH, timeout=10)
    scraped = await exported(mesh)

    queries = dashboard_queries() + alert_queries()
    named = set().union(*(metric_names(q) for q in queries))
    assert len(named) >= 8  # the reader found the metrics, not nothing
    assert named <= scraped, f"not exported: {sorted(named - scraped)}"
