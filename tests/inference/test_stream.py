"""StreamComplete: deltas as the provider writes them, then the cost; cache and ledger once."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from costmesh.inference.v1 import inference_pb2
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator, count_tokens
from tests.conftest import AUTH, Mesh, ledger_rows, running_mesh, user_request

CONFIG = """
[inference]
retry_base_seconds = 0.01

[features.plain]
router = "rules"
"""
QUESTION = "How do I reset my password?"


@pytest.fixture
async def mesh(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(simulator, tmp_path, CONFIG) as running:
        yield running


async def streamed(
    mesh: Mesh, text: str = QUESTION
) -> tuple[list[str], inference_pb2.CompleteResponse]:
    deltas, summary = [], None
    call = mesh.inference.StreamComplete(
        inference_pb2.StreamCompleteRequest(request=user_request(text, "plain")),
        metadata=AUTH,
        timeout=10,
    )
    async for message in call:
        if message.HasField("summary"):
            summary = message.summary
        else:
            deltas.append(message.delta)
    assert summary is not None
    return deltas, summary


async def test_the_answer_streams_in_pieces_and_the_summary_carries_usage_and_cost(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    deltas, summary = await streamed(mesh)
    rows = await ledger_rows(mesh)

    answer = f"[simulated] Answer to: {QUESTION}"
    assert len(deltas) > 3
    assert "".join(deltas) == answer
    assert summary.content == ""  # the text came in the deltas
    assert (summary.model, summary.finish_reason) == ("gpt-4o-mini", "stop")
    assert summary.usage.output_tokens == count_tokens(answer)  # the final chunk's usage
    assert summary.usage.input_tokens == count_tokens(QUESTION) + 4
    assert summary.cache_outcome == types_pb2.CACHE_OUTCOME_MISS
    assert [(r.model, r.cost_nano_usd) for r in rows] == [("gpt-4o-mini", summary.cost_nano_usd)]
    assert simulator.requests[0]["stream"] is True
    assert simulator.requests[0]["stream_options"] == {"include_usage": True}


async def test_a_streamed_answer_is_cached_once_complete(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    await streamed(mesh)
    again = await mesh.inference.Complete(
        user_request(QUESTION, "plain"), metadata=AUTH, timeout=10
    )
    deltas, summary = await streamed(mesh)

    assert again.cached
    assert again.content == f"[simulated] Answer to: {QUESTION}"
    assert deltas == [again.content]  # a hit streams as one piece
    assert summary.cached
    assert simulator.call_count == 1


async def test_a_stream_that_fails_to_open_is_retried(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.fail_next(1, status=503)

    deltas, summary = await streamed(mesh, "Another question")

    assert "".join(deltas) == "[simulated] Answer to: Another question"
    assert summary.attempts == 2


async def test_a_cancelled_stream_stops_the_provider_and_bills_what_was_produced(
    mesh: Mesh, simulator: OpenAISimulator
) -> None:
    simulator.set_stream_chunk_delay(0.5)  # the answer would take seconds to finish
    question = "Tell me everything about resetting passwords, in many words please"
    call = mesh.inference.StreamComplete(
        inference_pb2.StreamCompleteRequest(request=user_request(question, "plain")),
        metadata=AUTH,
        timeout=30,
    )
    first = await call.read()
    call.cancel()

    assert isinstance(first, inference_pb2.StreamCompleteResponse)
    assert first.delta  # some text arrived before the caller gave up
    assert await asyncio.to_thread(simulator.wait_for_cut_streams, 1, 10)  # provider stopped
    await mesh.running.stop(grace=5)  # the cancelled handler has recorded what it had
    with sqlite3.connect(mesh.data_dir / "ledger.sqlite3") as db:
        rows = db.execute("SELECT output_tokens, cost_nano_usd FROM usage").fetchall()

    ((output_tokens, cost),) = rows
    full_answer = count_tokens(f"[simulated] Answer to: {question}")
    assert 0 < output_tokens < full_answer
    assert cost > 0
