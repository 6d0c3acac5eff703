"""Usage survives a ledger outage and an inference restart, and is never counted twice."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from unittest.mock import patch

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from costmesh.inference.v1 import inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh_simulator import OpenAISimulator
from services.common.config import Config, load_config
from services.common.server import RunningServer
from services.inference import outbox as outbox_module
from services.inference.outbox import CONCURRENT_SENDS, RefusedError, UsageOutbox
from services.inference.outbox_file import OutboxFile
from services.mesh import start_mesh
from tests.conftest import AUTH, mesh_env, user_request
from tests.postgres import fresh_schema

SERVICE_KEY = "cm-test-service-key"


class SplitMesh:
    """Ledger in one server, the rest in another, so the ledger can go away alone."""

    def __init__(self, simulator: OpenAISimulator, data_dir: Path) -> None:
        self.env = {**mesh_env(simulator, data_dir), "COSTMESH_SERVICE_KEY": SERVICE_KEY}
        self.data_dir = data_dir
        self.provider = TracerProvider()
        self.ledger: RunningServer | None = None
        self.front: RunningServer | None = None
        self.ledger_port = 0

    def config(self) -> Config:
        path = self.data_dir / "costmesh.toml"
        path.write_text(
            f'[peers]\nledger = "127.0.0.1:{self.ledger_port}"\n'
            "[inference]\noutbox_retry_seconds = 0.05\n"
            # A model only the front knows: the ledger has no price for it.
            '[models."local-llama"]\nprovider = "openai"\ncontext_window = 8000\n'
        )
        return load_config(path, self.env)

    async def start_ledger(self, extra_toml: str = "") -> None:
        path = self.data_dir / "ledger.toml"
        path.write_text(extra_toml)
        self.ledger = await start_mesh(
            load_config(path, self.env), self.env, ["ledger"], self.provider, port=self.ledger_port
        )
        self.ledger_port = self.ledger.port

    async def start_front(self) -> None:
        names: Sequence[str] = ["cache", "router", "inference"]
        self.front = await start_mesh(self.config(), self.env, names, self.provider, port=0)

    async def complete(self, text: str, model: str = "") -> tuple[str, int, bool]:
        assert self.front is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.front.port}") as channel:
            reply = await inference_pb2_grpc.InferenceServiceStub(channel).Complete(
                user_request(text, model=model), metadata=AUTH, timeout=10
            )
        return reply.request_id, reply.cost_nano_usd, reply.cost_pending

    async def ledger_calls(self) -> tuple[int, int]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.ledger_port}") as channel:
            spend = await ledger_pb2_grpc.LedgerServiceStub(channel).QuerySpend(
                ledger_pb2.QuerySpendRequest(), metadata=AUTH, timeout=5
            )
        return sum(r.calls for r in spend.rows), spend.total_cost_nano_usd

    def outbox_counts(self) -> tuple[int, int]:
        """(parked, pending) records in inference's outbox file."""
        with sqlite3.connect(self.data_dir / "outbox.sqlite3") as outbox:
            parked = outbox.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0]
            pending = outbox.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        return int(parked), int(pending)

    async def wait_for_empty_outbox(self) -> None:
        # Poll: the ledger acknowledges before the outbox deletes its copy.
        async with asyncio.timeout(10):
            while self.outbox_counts()[1]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    async def wait_for_calls(self, expected: int) -> int:
        async with asyncio.timeout(10):
            # Poll: the outbox retries on its own schedule, in another server.
            while (found := await self.ledger_calls())[0] < expected:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        return found[1]


LOCAL_LLAMA_PRICED = (
    '[models."local-llama"]\nprovider = "openai"\ncontext_window = 8000\n'
    'input_usd_per_mtok = "0.01"\ncached_input_usd_per_mtok = "0.01"\n'
    'output_usd_per_mtok = "0.02"\n'
)


@pytest.fixture(params=["sqlite", "postgres"])
async def split(
    request: pytest.FixtureRequest, simulator: OpenAISimulator, tmp_path: Path
) -> AsyncIterator[SplitMesh]:
    """The split mesh, its ledger on SQLite or on the real PostgreSQL."""
    with contextlib.ExitStack() as stack:
        mesh = SplitMesh(simulator, tmp_path)
        if request.param == "postgres":
            mesh.env["LEDGER_DATABASE"] = stack.enter_context(fresh_schema())
        await mesh.start_ledger()
        await mesh.start_front()
        try:
            yield mesh
        finally:
            for server in (mesh.front, mesh.ledger):
                if server is not None:
                    await server.stop(grace=1)


async def test_ledger_outage_loses_nothing_and_counts_nothing_twice(split: SplitMesh) -> None:
    _, cost_before, pending_before = await split.complete("first, ledger up")
    assert split.ledger is not None
    await split.ledger.stop(grace=1)

    _, cost_during, pending_during = await split.complete("second, ledger down")
    await split.start_ledger()
    total = await split.wait_for_calls(2)

    assert not pending_before
    assert cost_before > 0
    assert not pending_during, "the front prices the call itself, ledger or not"
    assert cost_during > 0
    assert await split.ledger_calls() == (2, total)
    assert total == cost_before + cost_during, "the ledger priced it as the caller was told"


async def test_records_in_the_outbox_survive_an_inference_restart(split: SplitMesh) -> None:
    assert split.ledger is not None
    assert split.front is not None
    await split.ledger.stop(grace=1)
    _, cost, pending = await split.complete("recorded while the ledger is down")
    await split.front.stop(grace=1)  # inference goes away with the record on disk
    split.front = None

    await split.start_ledger()
    await split.start_front()
    total = await split.wait_for_calls(1)

    assert not pending
    assert total == cost > 0, "the delayed record is priced as the caller was told"
    assert (await split.ledger_calls())[0] == 1


async def test_a_model_the_ledger_cannot_price_waits_without_blocking_the_rest(
    split: SplitMesh,
) -> None:
    assert split.ledger is not None
    await split.ledger.stop(grace=1)
    _, _, unpriced_pending = await split.complete("unpriced model", model="local-llama")
    _, _, queued_behind = await split.complete("priced model, queued behind it")
    await split.start_ledger()

    await split.wait_for_calls(1)
    assert split.ledger is not None
    await split.ledger.stop(grace=1)  # the operator adds the missing price
    await split.start_ledger(LOCAL_LLAMA_PRICED)
    await split.wait_for_calls(2)
    await split.wait_for_empty_outbox()

    assert unpriced_pending
    assert not queued_behind, "a model the front can price is priced at once"
    assert split.outbox_counts() == (0, 0), "nothing parked, nothing left"


async def test_a_malformed_record_is_parked_and_the_next_one_delivered(split: SplitMesh) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{split.ledger_port}") as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        service_key = (("authorization", f"Bearer {SERVICE_KEY}"),)

        async def send(
            records: Sequence[ledger_pb2.UsageRecord], time_limit: float
        ) -> Sequence[ledger_pb2.RecordedUsage]:
            try:
                reply = await ledger.RecordUsage(
                    ledger_pb2.RecordUsageRequest(records=records),
                    metadata=service_key,
                    timeout=time_limit,
                )
            except grpc.aio.AioRpcError as exc:
                raise RefusedError(exc.details() or "", permanent=True) from exc
            return list(reply.results)

        outbox = UsageOutbox(split.data_dir / "unit-outbox.sqlite3", send, retry_seconds=60)
        malformed = ledger_pb2.UsageRecord(request_id="bad", team="t", feature="f")  # no model
        good = ledger_pb2.UsageRecord(request_id="good", team="t", feature="f", model="gpt-4o")
        refused = await outbox.deliver(malformed, 5)
        accepted = await outbox.deliver(good, 5)
        with sqlite3.connect(split.data_dir / "unit-outbox.sqlite3") as db:
            parked = db.execute("SELECT request_id, reason FROM dead_letter").fetchall()
        await outbox.stop()

    assert refused is None
    assert accepted is not None
    assert parked == [("bad", "records[0].model: required")]


async def test_a_replayed_pending_answer_carries_the_cost_once_the_ledger_has_it(
    split: SplitMesh,
) -> None:
    assert split.ledger is not None
    await split.ledger.stop(grace=1)
    assert split.front is not None
    # Only the ledger knows this model's price: the front cannot tell the caller.
    request = user_request("Charge me later", request_id="req-pending", model="local-llama")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{split.front.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        first = await stub.Complete(request, metadata=AUTH, timeout=10)
        await split.start_ledger(LOCAL_LLAMA_PRICED)
        total = await split.wait_for_calls(1)
        replay = await stub.Complete(request, metadata=AUTH, timeout=10)

    assert first.cost_pending
    assert not replay.cost_pending
    assert replay.cost_nano_usd == total > 0


class FakeLedger:
    """A ledger in memory: counts what it was sent; fails as told."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.sends: list[int] = []  # records per send that the ledger took
        self.delivered: Counter[str] = Counter()
        self.parked: list[str] = []
        self.down = False
        self.poison = "poison"

    async def send(
        self, records: Sequence[ledger_pb2.UsageRecord], time_limit: float
    ) -> Sequence[ledger_pb2.RecordedUsage]:
        await asyncio.sleep(0.001)
        if self.down:
            raise ConnectionError("ledger down")
        if any(r.request_id.startswith(self.poison) for r in records):
            raise RuntimeError("INTERNAL: the database cannot store this")
        if any(r.request_id.startswith("malformed") for r in records):
            raise RefusedError("malformed", permanent=True)
        self.sent.update(r.request_id for r in records)
        self.sends.append(len(records))
        return [ledger_pb2.RecordedUsage(request_id=r.request_id, cost_nano_usd=7) for r in records]

    async def on_delivered(
        self, results: Sequence[tuple[ledger_pb2.UsageRecord, ledger_pb2.RecordedUsage]]
    ) -> None:
        self.delivered.update(record.request_id for record, _ in results)

    def on_parked(self, records: Sequence[ledger_pb2.UsageRecord]) -> None:
        self.parked += [r.request_id for r in records]

    def outbox(self, path: Path, retry_seconds: float = 60) -> UsageOutbox:
        return UsageOutbox(path, self.send, retry_seconds, self.on_delivered, self.on_parked)


def _usage(request_id: str) -> ledger_pb2.UsageRecord:
    return ledger_pb2.UsageRecord(team="t", request_id=request_id, feature="f", model="m")


async def test_a_record_is_reported_delivered_once_while_the_flusher_runs(
    tmp_path: Path,
) -> None:
    ledger = FakeLedger()
    outbox = ledger.outbox(tmp_path / "o.sqlite3", retry_seconds=0)
    await outbox.start()
    for i in range(300):
        await outbox.enqueue([_usage(f"r{i}")], 5)
        if i % 7 == 0:
            await asyncio.sleep(0)
    await outbox.settled()
    await asyncio.sleep(0.1)
    await outbox.stop()

    assert set(ledger.delivered) == {f"r{i}" for i in range(300)}
    assert {k: n for k, n in ledger.delivered.items() if n > 1} == {}
    assert {k: n for k, n in ledger.sent.items() if n > 1} == {}


async def test_a_record_failing_in_a_batch_does_not_block_the_rest(tmp_path: Path) -> None:
    ledger = FakeLedger()
    outbox = ledger.outbox(tmp_path / "o.sqlite3")
    ledger.down = True
    for request_id in ("a", "poison-1", "b", "c"):
        await outbox.enqueue([_usage(request_id)], 5)
    await outbox.settled()
    ledger.down = False
    delivered = await outbox.flush()
    pending = outbox.pending_count()
    await outbox.stop()

    assert delivered == 3
    assert set(ledger.delivered) == {"a", "b", "c"}
    assert pending == 1, "the failing record stays for a later try"


async def test_while_the_ledger_is_down_records_are_left_to_the_flusher(tmp_path: Path) -> None:
    ledger = FakeLedger()
    outbox = ledger.outbox(tmp_path / "o.sqlite3")
    ledger.down = True
    await outbox.enqueue([_usage("first")], 5)
    await outbox.settled()  # its sender failed: the ledger is known to be down
    await outbox.enqueue([_usage("second")], 5)
    senders_while_down = len(outbox._senders)
    ledger.down = False
    await outbox.settled()  # runs the flush that sends both
    pending = outbox.pending_count()
    await outbox.stop()

    assert senders_while_down == 0
    assert pending == 0
    assert set(ledger.delivered) == {"first", "second"}


async def test_a_failed_outbox_write_sends_the_record_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full_disk(self: OutboxFile, inserts: Sequence[object]) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(OutboxFile, "put_all", full_disk)
    ledger = FakeLedger()
    outbox = ledger.outbox(tmp_path / "o.sqlite3")
    kept = await outbox.enqueue([_usage("direct")], 5)
    await outbox.settled()
    ledger.down = True
    await outbox.enqueue([_usage("lost")], 5)
    await outbox.settled()
    await outbox.stop()

    assert kept is False
    assert set(ledger.delivered) == {"direct"}
    assert any("usage LOST" in r.getMessage() and "lost" in r.getMessage() for r in caplog.records)


async def test_a_parked_record_is_reported_so_that_budgets_release_it(tmp_path: Path) -> None:
    ledger = FakeLedger()
    outbox = ledger.outbox(tmp_path / "o.sqlite3")
    await outbox.enqueue([_usage("malformed-1")], 5)
    ledger.down = True
    await outbox.enqueue([_usage("malformed-2")], 5)
    await outbox.settled()
    ledger.down = False
    await outbox.flush()
    await outbox.stop()

    assert ledger.parked == ["malformed-1", "malformed-2"]
    assert not ledger.delivered


async def test_records_and_the_callers_own_write_commit_together_or_not_at_all(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = FakeLedger()
    ledger.down = True  # nothing leaves the outbox: what is on disk stays to be seen
    with contextlib.closing(sqlite3.connect(tmp_path / "o.sqlite3")) as db:
        db.execute("CREATE TABLE remembered (what TEXT)")
    outbox = ledger.outbox(tmp_path / "o.sqlite3")

    def remember(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO remembered VALUES ('answer-1')")

    def fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO no_such_table VALUES (1)")

    # At once, so both land in one group commit: only the failing caller's part falls.
    kept, refused = await asyncio.gather(
        outbox.enqueue([_usage("answer-1"), _usage("embedding-1")], 5, remember),
        outbox.enqueue([_usage("answer-2")], 5, fail),
    )
    await outbox.settled()
    pending = outbox.pending_count()
    await outbox.stop()
    with contextlib.closing(sqlite3.connect(tmp_path / "o.sqlite3")) as db:
        remembered = db.execute("SELECT what FROM remembered").fetchall()

    assert (kept, refused) == (True, False)
    assert remembered == [("answer-1",)]
    assert pending == 2, "answer-2's row fell with its caller's failed write"
    assert any(
        "usage LOST" in r.getMessage() and "answer-2" in r.getMessage() for r in caplog.records
    )


async def test_calls_at_once_share_sends_and_each_record_is_delivered_once(
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    ledger = FakeLedger()
    outbox = ledger.outbox(tmp_path / "o.sqlite3")

    async def call(i: int) -> trace.SpanContext:
        with tracer.start_as_current_span(f"call-{i}") as span:
            await outbox.enqueue([_usage(f"answer-{i}"), _usage(f"embedding-{i}")], 5)
            return span.get_span_context()

    with patch.object(outbox_module, "_TRACER", tracer):
        callers = await asyncio.gather(*(call(i) for i in range(64)))
        await outbox.settled()
    pending = outbox.pending_count()
    await outbox.stop()

    records = {f"{kind}-{i}" for i in range(64) for kind in ("answer", "embedding")}
    assert set(ledger.delivered) == records
    assert set(ledger.delivered.values()) == {1}
    assert set(ledger.sent.values()) == {1}
    assert pending == 0
    # The first calls' records went at once, each call's in one send; the rest waited
    # and went together.
    assert ledger.sends[:CONCURRENT_SENDS] == [2] * CONCURRENT_SENDS
    assert len(ledger.sends) < 64
    assert max(ledger.sends) > 2
    batches = [s for s in exporter.get_finished_spans() if s.name == "costmesh.usage.deliver"]
    linked = {link.context.span_id for s in batches for link in s.links}
    assert linked == {c.span_id for c in callers[CONCURRENT_SENDS:]}
    assert all(s.parent is None for s in batches), "a batch is a trace of its own"
    carried = [dict(s.attributes or {}).get("costmesh.usage.records") for s in batches]
    assert sum(n for n in carried if isinstance(n, int)) == 2 * (64 - CONCURRENT_SENDS)
    assert all(len(s.links) <= 50 for s in batches), "one link per call, not per record"


async def test_a_call_alone_is_sent_in_its_own_trace(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    seen: list[trace.SpanContext] = []
    ledger = FakeLedger()

    async def send(
        records: Sequence[ledger_pb2.UsageRecord], time_limit: float
    ) -> Sequence[ledger_pb2.RecordedUsage]:
        seen.append(trace.get_current_span().get_span_context())
        return await ledger.send(records, time_limit)

    outbox = UsageOutbox(tmp_path / "o.sqlite3", send, 60, ledger.on_delivered)
    with patch.object(outbox_module, "_TRACER", tracer):
        with tracer.start_as_current_span("call") as span:
            await outbox.enqueue([_usage("alone")], 5)
        await outbox.settled()
    await outbox.stop()

    assert [c.trace_id for c in seen] == [span.get_span_context().trace_id]
    assert not [s for s in exporter.get_finished_spans() if s.name == "costmesh.usage.deliver"]


async def test_queued_records_left_by_a_failed_send_go_with_the_flusher(tmp_path: Path) -> None:
    ledger = FakeLedger()
    outbox = ledger.outbox(tmp_path / "o.sqlite3")
    ledger.down = True
    await asyncio.gather(*(outbox.enqueue([_usage(f"r{i}")], 5) for i in range(10)))
    while outbox._senders:
        await asyncio.wait(set(outbox._senders))
    ledger.down = False
    delivered = await outbox.flush()
    await outbox.stop()

    assert delivered == 10, "no record stays claimed by a send that failed"
    assert set(ledger.delivered) == {f"r{i}" for i in range(10)}
