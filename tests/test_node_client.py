"""Polyglot proof: a Node.js client built from the same protos calls the running mesh."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import DEMO_KEY, Mesh

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "tests" / "node" / "client.mjs"


def node_or_skip(package: str = "@grpc/grpc-js") -> str:
    """Node's path, when it and `package` are installed (in CI they must be)."""
    node = shutil.which("node")
    missing = None if node else "node is not installed"
    if node and not (ROOT / "node_modules" / package).is_dir():
        missing = "node_modules missing: run `npm ci`"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing} (required in CI)")
        pytest.skip(missing)
    assert node is not None
    return node


async def test_node_client_completes_hits_the_cache_and_reads_spend(mesh: Mesh) -> None:
    node = node_or_skip()
    process = await asyncio.create_subprocess_exec(
        node,
        str(CLIENT),
        env={**os.environ, "COSTMESH_ADDR": mesh.address, "COSTMESH_API_KEY": DEMO_KEY},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    result = json.loads(out)
    first, second, spend = result["first"], result["second"], result["spend"]

    assert first["cached"] is False
    assert first["model"] == "gpt-4o-mini"
    assert int(first["cost_nano_usd"]) > 0
    assert len(first["trace_id"]) == 32
    assert second["cached"] is True
    assert second["cache_outcome"] == "CACHE_OUTCOME_EXACT"
    assert second["content"] == first["content"]
    assert [row["key"] for row in spend["rows"]] == ["support"]
    assert int(spend["total_cost_nano_usd"]) == int(first["cost_nano_usd"])
