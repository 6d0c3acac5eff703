"""SubmitBatch through the provider's Batch API (BATCH_MODE_PROVIDER), end to end: the
real mesh, the real openai SDK, and the simulator's Files and Batch APIs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from costmesh.inference.v1 import inference_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from services.common.auth import hash_key
from services.common.config import load_config
from services.mesh import start_mesh
from tests.conftest import (
    AUTH,
    DEMO_KEY,
    Mesh,
    bad_request_fields,
    ledger_rows,
    mesh_env,
    running_mesh,
    user_request,
)

ALPHA = (("authorization", "Bearer alpha-key"),)
BETA = (("authorization", "Bearer beta-key"),)
CONFIG = f"""
[inference]
batch_poll_seconds = 0.05

[[auth.keys]]
team = "demo"
role = "admin"
sha256 = "{hash_key(DEMO_KEY)}"

[[auth.keys]]
team = "alpha"
role = "member"
sha256 = "{hash_key("alpha-key")}"

[[auth.keys]]
team = "beta"
role = "member"
sha256 = "{hash_key("beta-key")}"

# Every request of this feature goes to gpt-4o-mini; nothing is cached.
[features.nightly]
router = "rules"
tier = "simple"
cache_mode = "off"

# A provider that refuses every connection (the discard port).
[providers.down]
base_url = "http://127.0.0.1:9/v1"
api_key_env = "OPENAI_API_KEY"

[models."gpt-4o-down"]
provider = "down"
context_window = 128000
input_usd_per_mtok = "2.50"
cached_input_usd_per_mtok = "1.25"
output_usd_per_mtok = "10.00"
batch_discount = "0.5"
"""
QUESTIONS = ("When do you open?", "Where is my parcel?", "Can I pay by card?")
TERMINAL = ("completed", "failed", "expired", "cancelled")
# gpt-4o-mini in nano-USD per token: $0.15 and $0.60 per million.
MINI_INPUT, MINI_OUTPUT = 150, 600


def batch_of(
    questions: Sequence[str], ids: Sequence[str] | None = None, **fields: object
) -> inference_pb2.SubmitBatchRequest:
    ids = ids if ids is not None else [f"q{i}" for i in range(len(questions))]
    return inference_pb2.SubmitBatchRequest(
        feature="nightly",
        mode=inference_pb2.BATCH_MODE_PROVIDER,
        requests=[
            user_request(q, "nightly", request_id=i, **fields)
            for q, i in zip(questions, ids, strict=True)
        ],
    )


async def get_batch(
    mesh: Mesh, batch_id: str, metadata: tuple[tuple[str, str], ...] = AUTH
) -> inference_pb2.GetBatchResponse:
    request = inference_pb2.GetBatchRequest(batch_id=batch_id)
    return await mesh.inference.GetBatch(request, metadata=metadata, timeout=10)


async def until_done(mesh: Mesh, batch_id: str) -> inference_pb2.GetBatchResponse:
    """GetBatch until the batch has ended (each call also refreshes it)."""
    async with asyncio.timeout(10):
        # Poll: the provider batch ends in another process's time (the simulator's).
        while (reply := await get_batch(mesh, batch_id)).status not in TERMINAL:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return reply


async def rows_when(
    mesh: Mesh, ready: Callable[[list[ledger_pb2.UsageRecord]], bool]
) -> list[ledger_pb2.UsageRecord]:
    """The ledger's rows once `ready` holds for them (the poller writes them)."""
    async with asyncio.timeout(10):
        # Poll: the poller writes on its own schedule, in the server.
        while not ready(rows := await ledger_rows(mesh)):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return rows


def batch_rows(rows: Sequence[ledger_pb2.UsageRecord]) -> list[ledger_pb2.UsageRecord]:
    return [r for r in rows if r.batch]


async def test_a_batch_is_answered_at_half_price_and_billed_exactly_once(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    async with running_mesh(simulator, tmp_path, CONFIG) as mesh:
        submitted = await mesh.inference.SubmitBatch(batch_of(QUESTIONS), metadata=AUTH, timeout=10)
        waiting = await get_batch(mesh, submitted.batch_id)

        assert submitted.batch_id.startswith("batch_")
        assert (waiting.status, waiting.total, waiting.completed, waiting.failed) == (
            "in_progress", 3, 0, 0
        )  # fmt: skip
        assert waiting.mode == inference_pb2.BATCH_MODE_PROVIDER
        assert not waiting.results
        (provider_batch,) = simulator.batches
        assert provider_batch["metadata"]["costmesh_batch_id"] == submitted.batch_id
        assert provider_batch["request_counts"]["total"] == 3
        assert simulator.call_count == 0, "nothing went through the real-time endpoint"

        simulator.complete_batches()
        # The poller records the answers without anyone asking for them.
        rows = await rows_when(mesh, lambda rows: len(rows) == 3)
        done = await until_done(mesh, submitted.batch_id)

        assert (done.status, done.total, done.completed, done.failed) == ("completed", 3, 3, 0)
        assert [r.request_id for r in done.results] == ["q0", "q1", "q2"]
        assert [r.content for r in done.results] == [
            f"[simulated] Answer to: {q}" for q in QUESTIONS
        ]
        assert {r.model for r in done.results} == {"gpt-4o-mini"}
        assert all(r.finish_reason == "stop" and r.usage.output_tokens > 0 for r in done.results)
        assert all(r.batch and r.purpose == ledger_pb2.CALL_PURPOSE_ANSWER for r in rows)
        assert {r.team for r in rows} == {"demo"}
        assert {r.feature for r in rows} == {"nightly"}
        by_caller_id = {r.client_request_id: r for r in rows}
        for result in done.results:
            row = by_caller_id[result.request_id]
            assert not result.cost_pending
            assert result.cost_nano_usd == row.cost_nano_usd > 0
            assert row.usage == result.usage
            assert row.trace_id == result.trace_id

        # The same request answered in real time costs exactly twice as much.
        normal = await mesh.inference.Complete(
            user_request(QUESTIONS[0], "nightly"), metadata=AUTH, timeout=10
        )
        first = done.results[0]
        assert normal.usage == first.usage
        full_price = MINI_INPUT * first.usage.input_tokens + MINI_OUTPUT * first.usage.output_tokens
        assert normal.cost_nano_usd == full_price
        assert first.cost_nano_usd * 2 == full_price

        for _ in range(3):
            again = await get_batch(mesh, submitted.batch_id)
            assert [r.cost_nano_usd for r in again.results] == [
                r.cost_nano_usd for r in done.results
            ]
        after = await ledger_rows(mesh)

    assert len(batch_rows(after)) == 3, "asking again records nothing again"
    assert len(after) == 4  # and the real-time call


async def test_a_batch_in_flight_survives_a_restart_and_is_billed_once(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    async with running_mesh(simulator, tmp_path, CONFIG) as mesh:
        submitted = await mesh.inference.SubmitBatch(batch_of(QUESTIONS), metadata=AUTH, timeout=10)
    simulator.complete_batches()  # while inference is down

    async with running_mesh(simulator, tmp_path, CONFIG) as mesh:
        rows = await rows_when(mesh, lambda rows: len(rows) == 3)
        done = await until_done(mesh, submitted.batch_id)

    assert (done.status, done.completed) == ("completed", 3)
    assert [r.request_id for r in done.results] == ["q0", "q1", "q2"]
    assert len(batch_rows(rows)) == 3

    # A crash after the ledger took the rows but before they were marked recorded:
    # the next start sends them again and the ledger ignores the repeats.
    with contextlib.closing(sqlite3.connect(tmp_path / "batches.sqlite3")) as db, db:
        db.execute("UPDATE requests SET ledger = 0, cost_nano_usd = 0")
        db.execute("UPDATE jobs SET finished = 0")
    async with running_mesh(simulator, tmp_path, CONFIG) as mesh:
        again = await until_done(mesh, submitted.batch_id)
        rows_after = await ledger_rows(mesh)

    assert [r.cost_nano_usd for r in again.results] == [r.cost_nano_usd for r in done.results]
    assert not any(r.cost_pending for r in again.results)
    assert len(batch_rows(rows_after)) == 3


async def test_a_failed_line_is_reported_and_not_billed(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    simulator.fail_batch_line("q1", 500, "the model fell over")
    async with running_mesh(simulator, tmp_path, CONFIG) as mesh:
        submitted = await mesh.inference.SubmitBatch(batch_of(QUESTIONS), metadata=AUTH, timeout=10)
        simulator.complete_batches()
        done = await until_done(mesh, submitted.batch_id)
        rows = await ledger_rows(mesh)

    assert (done.status, done.total, done.completed, done.failed) == ("completed", 3, 2, 1)
    assert [r.request_id for r in done.results] == ["q0", "q2"]
    (failure,) = done.failures
    assert (failure.request_id, failure.code) == ("q1", "UNAVAILABLE")
    assert "the model fell over" in failure.message
    assert sorted(r.client_request_id for r in batch_rows(rows)) == ["q0", "q2"]


async def test_an_expired_batch_keeps_what_was_answered(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    async with running_mesh(simulator, tmp_path, CONFIG) as mesh:
        submitted = await mesh.inference.SubmitBatch(batch_of(QUESTIONS), metadata=AUTH, timeout=10)
        simulator.advance_batches(1)
        progress = await get_batch(mesh, submitted.batch_id)
        simulator.expire_batches()
        done = await until_done(mesh, submitted.batch_id)
        rows = await ledger_rows(mesh)

    assert (progress.status, progress.completed, len(progress.results)) == ("in_progress", 1, 0)
    assert (done.status, done.completed, done.failed) == ("expired", 1, 2)
    assert [r.request_id for r in done.results] == ["q0"]
    assert [(f.request_id, f.code) for f in done.failures] == [
        ("q1", "DEADLINE_EXCEEDED"), ("q2", "DEADLINE_EXCEEDED")
    ]  # fmt: skip
    assert [r.client_request_id for r in batch_rows(rows)] == ["q0"]


def _with_empty_message() -> inference_pb2.SubmitBatchRequest:
    request = batch_of(QUESTIONS)
    request.requests[2].messages[0].content = "  "
    return request


def _with_experiment(field: str) -> inference_pb2.SubmitBatchRequest:
    request = batch_of(QUESTIONS)
    if field == "arm":
        request.requests[1].arm = types_pb2.ARM_CONTROL
    else:
        request.requests[1].experiment = "trial"
    return request


def _unknown_feature() -> inference_pb2.SubmitBatchRequest:
    request = batch_of(QUESTIONS)
    request.feature = "nope"
    return request


def _with_mode(mode: int) -> inference_pb2.SubmitBatchRequest:
    batch = batch_of(QUESTIONS[:1])
    batch.mode = mode  # type: ignore[assignment]  # a number newer than this build knows
    return batch


BAD_BATCHES = [
    ("duplicate id", batch_of(QUESTIONS, ["a", "b", "a"]), "requests[2].request_id"),
    ("missing id", batch_of(QUESTIONS, ["", "b", "c"]), "requests[0].request_id"),
    ("empty message", _with_empty_message(), "requests[2].messages[0].content"),
    ("unknown model", batch_of(QUESTIONS[:1], model="gpt-9000"), "requests[0].model"),
    ("unknown feature", _unknown_feature(), "feature"),
    ("experiment", _with_experiment("experiment"), "requests[1].experiment"),
    ("arm", _with_experiment("arm"), "requests[1].arm"),
    ("no requests", inference_pb2.SubmitBatchRequest(feature="nightly"), "requests"),
    ("unknown mode", _with_mode(42), "mode"),
]


@pytest.mark.parametrize(
    ("request_", "field"), [c[1:] for c in BAD_BATCHES], ids=[c[0] for c in BAD_BATCHES]
)
async def test_an_invalid_request_refuses_the_batch_naming_it_and_nothing_is_sent(
    simulator: OpenAISimulator,
    tmp_path: Path,
    request_: inference_pb2.SubmitBatchRequest,
    field: str,
) -> None:
    async with running_mesh(simulator, tmp_path, CONFIG) as mesh:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.inference.SubmitBatch(request_, metadata=AUTH, timeout=10)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == [field]
    assert field in (caught.value.details() or "")
    assert simulator.files == []
    assert simulator.batches == []


async def test_only_the_submitting_team_or_an_admin_reads_a_batch(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    async with running_mesh(simulator, tmp_path, CONFIG) as mesh:
        submitted = await mesh.inference.SubmitBatch(
            batch_of(QUESTIONS), metadata=ALPHA, timeout=10
        )
        own = await get_batch(mesh, submitted.batch_id, ALPHA)
        admin = await get_batch(mesh, submitted.batch_id, AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as other_team:
            await get_batch(mesh, submitted.batch_id, BETA)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await get_batch(mesh, "batch_" + "0" * 32, ALPHA)

    assert own.total == admin.total == 3
    assert other_team.value.code() == grpc.StatusCode.NOT_FOUND
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    # Another team's batch looks exactly like one that does not exist.
    assert (other_team.value.details() or "").replace(submitted.batch_id, "ID") == (
        unknown.value.details() or ""
    ).replace("batch_" + "0" * 32, "ID")


async def test_each_model_gets_its_own_provider_batch_and_the_trace_shows_the_job(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    request = batch_of(QUESTIONS)
    request.requests[1].model = "gpt-4o"
    async with running_mesh(simulator, tmp_path, CONFIG) as mesh:
        submitted = await mesh.inference.SubmitBatch(request, metadata=AUTH, timeout=10)
        simulator.complete_batches()
        done = await until_done(mesh, submitted.batch_id)
        rows = await ledger_rows(mesh)

    assert sorted(b["model"] for b in simulator.batches) == ["gpt-4o", "gpt-4o-mini"]
    assert [r.model for r in done.results] == ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini"]
    assert {r.client_request_id: r.model for r in rows} == {
        "q0": "gpt-4o-mini", "q1": "gpt-4o", "q2": "gpt-4o-mini"
    }  # fmt: skip
    assert {body["model"] for body in simulator.batch_requests} == {"gpt-4o", "gpt-4o-mini"}
    assert all(body["max_tokens"] == 512 for body in simulator.batch_requests)
    spans = mesh.spans.get_finished_spans()
    (submit,) = [s for s in spans if s.name == "batch.submit"]
    assert submit.attributes is not None
    assert submit.attributes["costmesh.batch_id"] == submitted.batch_id
    assert submit.attributes["costmesh.batch.total"] == 3
    assert submit.attributes["costmesh.batch.parts"] == 2
    polls = [s for s in spans if s.name == "batch.poll" and s.attributes]
    last = [
        s for s in polls if s.attributes and s.attributes["costmesh.batch.status"] == "completed"
    ]
    assert last
    assert last[-1].attributes is not None
    assert last[-1].attributes["costmesh.batch.completed"] == 3
    assert all(link.context.trace_id == submit.context.trace_id for s in polls for link in s.links)


async def test_a_provider_that_cannot_take_the_batch(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    down = batch_of(QUESTIONS[:1], model="gpt-4o-down")
    partly = batch_of(QUESTIONS[:2])
    partly.requests[1].model = "gpt-4o-down"
    async with running_mesh(simulator, tmp_path, CONFIG) as mesh:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.inference.SubmitBatch(down, metadata=AUTH, timeout=30)
        submitted = await mesh.inference.SubmitBatch(partly, metadata=AUTH, timeout=30)
        simulator.complete_batches()
        done = await until_done(mesh, submitted.batch_id)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [r.request_id for r in done.results] == ["q0"]
    assert [(f.request_id, f.code) for f in done.failures] == [("q1", "UNAVAILABLE")]
    assert done.status == "completed"


async def test_a_batch_created_whose_reply_was_lost_is_found_not_made_twice(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    simulator.lose_next_reply("/v1/batches")  # created, but the answer never arrives
    async with running_mesh(simulator, tmp_path, CONFIG) as mesh:
        submitted = await mesh.inference.SubmitBatch(batch_of(QUESTIONS), metadata=AUTH, timeout=30)
        simulator.complete_batches()
        done = await until_done(mesh, submitted.batch_id)
        rows = await ledger_rows(mesh)

    (provider_batch,) = simulator.batches
    assert provider_batch["metadata"]["costmesh_batch_id"] == submitted.batch_id
    assert (done.status, done.completed) == ("completed", 3)
    assert len(batch_rows(rows)) == 3


@contextlib.asynccontextmanager
async def mesh_without_ledger(simulator: OpenAISimulator, tmp_path: Path) -> AsyncIterator[Mesh]:
    """Cache, router and inference, with the ledger at a loopback port nothing serves."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    config = tmp_path / "no-ledger.toml"
    config.write_text(f'{CONFIG}\n[peers]\nledger = "{dead}"\n')
    env = {**mesh_env(simulator, tmp_path), "COSTMESH_SERVICE_KEY": "cm-test-service"}
    names = ["cache", "router", "inference"]
    running = await start_mesh(load_config(config, env), env, names, TracerProvider(), port=0)
    address = f"127.0.0.1:{running.port}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield Mesh(running, address, channel, InMemorySpanExporter(), tmp_path)
    finally:
        await running.stop(grace=1)


async def test_results_wait_for_their_cost_through_a_ledger_outage(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    async with mesh_without_ledger(simulator, tmp_path) as mesh:
        submitted = await mesh.inference.SubmitBatch(batch_of(QUESTIONS), metadata=AUTH, timeout=10)
        simulator.complete_batches()
        pending = await until_done(mesh, submitted.batch_id)

    async with running_mesh(simulator, tmp_path, CONFIG) as mesh:
        settled = await until_done(mesh, submitted.batch_id)
        rows = await rows_when(mesh, lambda rows: len(rows) == 3)
        again = await get_batch(mesh, submitted.batch_id)
        rows_after = await ledger_rows(mesh)

    assert pending.completed == 3
    assert all(r.cost_pending and r.cost_nano_usd == 0 for r in pending.results)
    costs = {r.client_request_id: r.cost_nano_usd for r in batch_rows(rows)}
    assert not any(r.cost_pending for r in settled.results)
    assert {r.request_id: r.cost_nano_usd for r in settled.results} == costs
    assert all(cost > 0 for cost in costs.values())
    assert [r.cost_nano_usd for r in again.results] == [r.cost_nano_usd for r in settled.results]
    assert len(batch_rows(rows_after)) == 3
