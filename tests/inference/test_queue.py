"""SubmitBatch with BATCH_MODE_QUEUE: the micro-batching queue, in memory and in Redis.

The first tests drive the whole mesh; the ones after them drive MicroBatchQueue on its
own with a controllable `answer`, where batching, concurrency and takeover are exact.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from costmesh.inference.v1 import inference_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh_simulator import OpenAISimulator
from services.common.auth import Principal, hash_key
from services.common.config import ConfigError, load_config
from services.common.errors import NotFound, ResourceExhausted, Unavailable
from services.inference import queue
from services.inference.batch_requests import MAX_CALLER_ID
from services.inference.queue import MicroBatchQueue
from services.mesh import DEMO_KEY_DIGEST
from tests.conftest import AUTH, Mesh, bad_request_fields, running_mesh, user_request
from tests.redis_server import fresh_prefix

BACKENDS = ["memory", "redis"]
DEADLINE = 30.0
ALPHA_KEY, BETA_KEY = "cm-test-alpha-member", "cm-test-beta-member"
ALPHA = (("authorization", f"Bearer {ALPHA_KEY}"),)
BETA = (("authorization", f"Bearer {BETA_KEY}"),)
KEYS = f"""
[[auth.keys]]
team = "demo"
role = "admin"
sha256 = "{DEMO_KEY_DIGEST}"

[[auth.keys]]
team = "alpha"
role = "member"
sha256 = "{hash_key(ALPHA_KEY)}"

[[auth.keys]]
team = "beta"
role = "member"
sha256 = "{hash_key(BETA_KEY)}"
"""
NO_CACHE = inference_pb2.CacheControl(no_cache=True)


@dataclass(frozen=True)
class Backend:
    name: str
    url: str = ""
    prefix: str = ""

    def toml(self, **settings: object) -> str:
        lines = ["[queue]", f'backend = "{self.name}"']
        if self.name == "redis":
            lines += [f'redis_url = "{self.url}"', f'redis_prefix = "{self.prefix}"']
        lines += [f"{key} = {value}" for key, value in settings.items()]
        return "\n".join(lines) + "\n"


@contextmanager
def _backend(name: str) -> Iterator[Backend]:
    if name == "memory":
        yield Backend("memory")
        return
    with fresh_prefix() as (url, prefix):
        yield Backend("redis", url, prefix)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    with _backend(request.param) as chosen:
        yield chosen


@pytest.fixture
def redis_backend() -> Iterator[Backend]:
    with _backend("redis") as chosen:
        yield chosen


def batch_of(
    count: int, feature: str = "support", prefix: str = "item", **fields: object
) -> inference_pb2.SubmitBatchRequest:
    """A batch whose requests name no feature: the batch's fills it in."""
    return inference_pb2.SubmitBatchRequest(
        feature=feature,
        mode=inference_pb2.BATCH_MODE_QUEUE,
        requests=[
            user_request(
                f"Queued question {prefix} {i}: where is parcel {i}?",
                "",
                **{"request_id": f"{prefix}-{i}", **fields},
            )
            for i in range(count)
        ],
    )


async def wait_until_done(
    mesh: Mesh, batch_id: str, metadata: tuple[tuple[str, str], ...] = AUTH
) -> inference_pb2.GetBatchResponse:
    """GetBatch until the batch is completed, or fail at the deadline."""
    give_up = time.monotonic() + DEADLINE
    while True:
        reply = await mesh.inference.GetBatch(
            inference_pb2.GetBatchRequest(batch_id=batch_id), metadata=metadata, timeout=10
        )
        if reply.status == "completed":
            return reply
        assert time.monotonic() < give_up, f"batch not done in time: {reply}"
        await asyncio.sleep(0.05)


async def answer_rows(mesh: Mesh, batch_id: str, expected: int) -> list[ledger_pb2.UsageRecord]:
    """The ledger's answer rows of a batch, once at least `expected` have arrived."""
    give_up = time.monotonic() + DEADLINE
    while True:
        rows = [
            item.record
            async for item in mesh.ledger.ExportUsage(
                ledger_pb2.ExportUsageRequest(), metadata=AUTH, timeout=10
            )
            if item.record.purpose == ledger_pb2.CALL_PURPOSE_ANSWER
            and item.record.client_request_id.startswith(f"{batch_id}:")
        ]
        if len(rows) >= expected:
            return rows
        assert time.monotonic() < give_up, f"only {len(rows)} of {expected} ledger rows"
        await asyncio.sleep(0.05)


# -- the whole mesh ----------------------------------------------------------------------


async def test_a_batch_is_answered_with_the_callers_ids_and_billed_once_each(
    backend: Backend, simulator: OpenAISimulator, tmp_path: Path
) -> None:
    async with running_mesh(simulator, tmp_path, backend.toml()) as mesh:
        submitted = await mesh.inference.SubmitBatch(batch_of(20), metadata=AUTH, timeout=10)
        done = await wait_until_done(mesh, submitted.batch_id)
        rows = await answer_rows(mesh, submitted.batch_id, 20)

    ids = [f"item-{i}" for i in range(20)]
    assert submitted.batch_id.startswith("queue_")
    assert (done.total, done.completed, done.failed) == (20, 20, 0)
    assert done.mode == inference_pb2.BATCH_MODE_QUEUE
    assert [r.request_id for r in done.results] == ids, "the caller's ids, in the caller's order"
    assert all(r.content for r in done.results)
    billed = collections.Counter(r.client_request_id for r in rows)
    assert billed == {f"{submitted.batch_id}:{i}": 1 for i in ids}, "each billed exactly once"
    assert {r.team for r in rows} == {"demo"}
    assert {r.feature for r in rows} == {"support"}, "the batch's feature filled each request"
    # One trace from the SubmitBatch call to every answer and its ledger row.
    (submit_span,) = [s for s in mesh.spans.get_finished_spans() if s.name.endswith("SubmitBatch")]
    assert submit_span.context is not None
    trace_id = f"{submit_span.context.trace_id:032x}"
    assert {r.trace_id for r in done.results} == {trace_id}
    assert {r.trace_id for r in rows} == {trace_id}


async def test_a_provider_failure_fails_only_its_request(
    backend: Backend, simulator: OpenAISimulator, tmp_path: Path
) -> None:
    simulator.fail_next(1, status=400, message="this one is refused")
    async with running_mesh(simulator, tmp_path, backend.toml()) as mesh:
        submitted = await mesh.inference.SubmitBatch(batch_of(8), metadata=AUTH, timeout=10)
        done = await wait_until_done(mesh, submitted.batch_id)
        rows = await answer_rows(mesh, submitted.batch_id, 7)

    assert (done.status, done.total, done.completed, done.failed) == ("completed", 8, 7, 1)
    (failure,) = done.failures
    assert failure.code == "INVALID_ARGUMENT"
    assert "this one is refused" in failure.message
    answered = {r.request_id for r in done.results}
    assert failure.request_id not in answered
    assert answered | {failure.request_id} == {f"item-{i}" for i in range(8)}
    assert len(rows) == 7


BAD_BATCHES = {
    "requests": inference_pb2.SubmitBatchRequest(feature="support"),
    "feature": batch_of(2, feature="nonesuch"),
    "requests[0].request_id": batch_of(3, request_id=""),
    "requests[1].request_id": batch_of(3, request_id="same"),
    "requests[0].model": batch_of(3, model="gpt-nonesuch"),
    "requests[0].feature": batch_of(2, feature=""),
    "requests[0].params.max_tokens": batch_of(1, params={"max_tokens": 0}),
}


async def test_a_bad_batch_is_refused_naming_the_field_and_nothing_is_queued(
    backend: Backend, simulator: OpenAISimulator, tmp_path: Path
) -> None:
    refused = {}
    async with running_mesh(simulator, tmp_path, backend.toml()) as mesh:
        for field, batch in [
            *BAD_BATCHES.items(),
            ("requests", batch_of(queue.MAX_REQUESTS + 1)),
            (
                "requests[0].request_id",
                batch_of(1, request_id="x" * (MAX_CALLER_ID + 1)),
            ),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await mesh.inference.SubmitBatch(batch, metadata=AUTH, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert (caught.value.details() or "").startswith(f"{field}: ")
            refused[field] = bad_request_fields(caught.value)
        # A good batch after them: when it is done, only its one request has run.
        good = await mesh.inference.SubmitBatch(batch_of(1), metadata=AUTH, timeout=10)
        await wait_until_done(mesh, good.batch_id)

    assert refused == {field: [field] for field in refused}
    assert simulator.call_count == 1


async def test_a_request_naming_another_feature_than_its_batch_is_refused(
    backend: Backend, simulator: OpenAISimulator, tmp_path: Path
) -> None:
    batch = batch_of(3)
    batch.requests[2].feature = "default"
    async with running_mesh(simulator, tmp_path, backend.toml()) as mesh:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.inference.SubmitBatch(batch, metadata=AUTH, timeout=10)
        batch.requests[2].feature = "support"  # the same as the batch's: fine
        accepted = await mesh.inference.SubmitBatch(batch, metadata=AUTH, timeout=10)
        done = await wait_until_done(mesh, accepted.batch_id)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["requests[2].feature"]
    assert done.completed == 3


async def test_only_the_submitting_team_or_an_admin_reads_a_batch(
    backend: Backend, simulator: OpenAISimulator, tmp_path: Path
) -> None:
    async with running_mesh(simulator, tmp_path, backend.toml() + KEYS) as mesh:
        submitted = await mesh.inference.SubmitBatch(batch_of(2), metadata=ALPHA, timeout=10)
        own = await wait_until_done(mesh, submitted.batch_id, ALPHA)
        by_admin = await wait_until_done(mesh, submitted.batch_id, AUTH)
        refused = []
        for batch_id, metadata in [
            (submitted.batch_id, BETA),
            ("queue_" + "0" * 32, ALPHA),
            ("queue_not-an-id", AUTH),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await mesh.inference.GetBatch(
                    inference_pb2.GetBatchRequest(batch_id=batch_id), metadata=metadata, timeout=10
                )
            refused.append(caught.value.code())
        rows = await answer_rows(mesh, submitted.batch_id, 2)

    assert own.completed == by_admin.completed == 2
    assert refused == [grpc.StatusCode.NOT_FOUND] * 3, "another team learns nothing of it"
    assert {r.team for r in rows} == {"alpha"}, "billed to the team that submitted"


async def test_a_consumer_restart_loses_nothing_and_answers_each_once(
    redis_backend: Backend, simulator: OpenAISimulator, tmp_path: Path
) -> None:
    config = redis_backend.toml(concurrency=2, max_batch=4, max_wait_ms=0)
    batch = batch_of(12, cache_control=NO_CACHE)
    simulator.set_latency(0.5)
    async with running_mesh(simulator, tmp_path, config) as mesh:
        submitted = await mesh.inference.SubmitBatch(batch, metadata=AUTH, timeout=10)
        assert await asyncio.to_thread(simulator.wait_for_arrivals, 2, DEADLINE)
    # Stopped mid-batch: the two under way were finished, the rest is still in Redis.
    client = redis.Redis.from_url(redis_backend.url)
    try:
        stream = f"{redis_backend.prefix}:stream"
        left = client.xlen(stream)
        pending = client.xpending(stream, "costmesh")["pending"]
        stored = client.hlen(f"{redis_backend.prefix}:results:{submitted.batch_id}")
    finally:
        client.close()
    assert 0 < left == 12 - stored, "what was not answered is still queued"
    assert pending >= 1, "taken but not started: pending, not lost"

    simulator.set_latency(0)
    async with running_mesh(simulator, tmp_path, config) as mesh:  # same data dir, same prefix
        done = await wait_until_done(mesh, submitted.batch_id)
        rows = await answer_rows(mesh, submitted.batch_id, 12)

    assert (done.completed, done.failed) == (12, 0)
    assert sorted(r.request_id for r in done.results) == sorted(f"item-{i}" for i in range(12))
    assert collections.Counter(r.client_request_id for r in rows) == {
        f"{submitted.batch_id}:item-{i}": 1 for i in range(12)
    }
    assert simulator.call_count == 12, "no request went to the provider twice"


async def test_an_answer_whose_ack_was_lost_is_replayed_without_billing_twice(
    redis_backend: Backend,
    simulator: OpenAISimulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consumer that answered a request and stopped before storing and acking it:
    the next one answers it again, and the mesh's idempotency (the batch-unique
    request_id) serves the first answer instead of paying and billing again."""
    finish = queue.RedisBackend.finish
    lost = asyncio.Event()

    async def lose_the_first(self: queue.RedisBackend, item: object, outcome: object) -> None:
        if not lost.is_set():
            lost.set()
            raise redis.exceptions.ConnectionError("simulated crash before the ack")
        await finish(self, item, outcome)  # type: ignore[arg-type]

    monkeypatch.setattr(queue.RedisBackend, "finish", lose_the_first)
    config = redis_backend.toml(concurrency=1)
    async with running_mesh(simulator, tmp_path, config) as mesh:
        submitted = await mesh.inference.SubmitBatch(
            batch_of(3, cache_control=NO_CACHE), metadata=AUTH, timeout=10
        )
        await answer_rows(mesh, submitted.batch_id, 3)
        await asyncio.wait_for(lost.wait(), DEADLINE)
    async with running_mesh(simulator, tmp_path, config) as mesh:
        done = await wait_until_done(mesh, submitted.batch_id)
        rows = await answer_rows(mesh, submitted.batch_id, 3)

    assert (done.completed, done.failed) == (3, 0)
    assert len(rows) == 3, "the replayed answer was not billed again"
    assert simulator.call_count == 3, "nor paid for again"


# -- MicroBatchQueue on its own ----------------------------------------------------------

PRINCIPAL = Principal("demo", "admin")


class Answers:
    """A stand-in request path that counts what runs at once and can hold answers."""

    def __init__(self) -> None:
        self.calls: list[inference_pb2.CompleteRequest] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: dict[str, BaseException] = {}

    async def __call__(
        self, request: inference_pb2.CompleteRequest, principal: Principal
    ) -> inference_pb2.CompleteResponse:
        self.calls.append(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            error = self.fail.get(request.request_id.split(":", 1)[1])
            if error is not None:
                raise error
            return inference_pb2.CompleteResponse(
                request_id=request.request_id, content=f"answer for {principal.team}"
            )
        finally:
            self.in_flight -= 1


@asynccontextmanager
async def standalone(
    backend: Backend,
    tmp_path: Path,
    answer: Callable[
        [inference_pb2.CompleteRequest, Principal], Awaitable[inference_pb2.CompleteResponse]
    ],
    *,
    start: bool = True,
    **settings: object,
) -> AsyncIterator[tuple[MicroBatchQueue, InMemorySpanExporter]]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    path = tmp_path / "queue.toml"
    path.write_text(backend.toml(**settings))
    config = load_config(path, env={"COSTMESH_DATA_DIR": str(tmp_path)})
    micro = MicroBatchQueue(
        config,
        answer,
        tracer=provider.get_tracer("test"),
        consumer="standalone",
        max_waiting=10,
    )
    if start:
        await micro.start()
    try:
        yield micro, spans
    finally:
        await micro.stop()
        provider.shutdown()


async def done(micro: MicroBatchQueue, batch_id: str) -> inference_pb2.GetBatchResponse:
    give_up = time.monotonic() + DEADLINE
    while (reply := await micro.get(batch_id, PRINCIPAL)).status != "completed":
        assert time.monotonic() < give_up, f"batch not done in time: {reply}"
        await asyncio.sleep(0.02)
    return reply


def batch_spans(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == "queue.batch"]


def batch_sizes(spans: InMemorySpanExporter) -> list[object]:
    return [dict(s.attributes or {}).get("costmesh.queue.size") for s in batch_spans(spans)]


async def test_full_batches_go_at_once_without_waiting_max_wait(
    backend: Backend, tmp_path: Path
) -> None:
    answers = Answers()
    async with standalone(backend, tmp_path, answers, max_batch=4, max_wait_ms=60_000) as (
        micro,
        spans,
    ):
        started = time.monotonic()
        submitted = await micro.submit(batch_of(8), PRINCIPAL)
        reply = await done(micro, submitted.batch_id)
        elapsed = time.monotonic() - started

    assert reply.completed == 8
    assert batch_sizes(spans) == [4, 4]
    assert elapsed < 30, "full batches do not wait the minute max_wait allows"


async def test_requests_of_several_batches_share_a_consumer_batch(
    backend: Backend, tmp_path: Path
) -> None:
    answers = Answers()
    async with standalone(
        backend, tmp_path, answers, start=False, max_batch=3, max_wait_ms=60_000
    ) as (micro, spans):
        ids = [(await micro.submit(batch_of(1, prefix=p), PRINCIPAL)).batch_id for p in "abc"]
        queued = await micro.get(ids[0], PRINCIPAL)
        await micro.start()
        replies = [await done(micro, batch_id) for batch_id in ids]

    assert queued.status == "queued"
    assert [r.completed for r in replies] == [1, 1, 1]
    assert batch_sizes(spans) == [3]


async def test_a_lone_request_waits_max_wait_for_company_then_goes(
    backend: Backend, tmp_path: Path
) -> None:
    answers = Answers()
    async with standalone(backend, tmp_path, answers, max_batch=16, max_wait_ms=300) as (
        micro,
        spans,
    ):
        submitted = await micro.submit(batch_of(1), PRINCIPAL)
        await done(micro, submitted.batch_id)

    (span,) = batch_spans(spans)
    assert span.attributes is not None
    assert span.attributes["costmesh.queue.size"] == 1
    assert 300 <= span.attributes["costmesh.queue.wait_ms"] < 30_000  # type: ignore[operator]


async def test_at_most_concurrency_requests_run_at_once(backend: Backend, tmp_path: Path) -> None:
    answers = Answers()
    answers.gate.clear()
    async with standalone(backend, tmp_path, answers, max_batch=4, concurrency=3) as (micro, _):
        submitted = await micro.submit(batch_of(10), PRINCIPAL)
        give_up = time.monotonic() + DEADLINE
        while answers.in_flight < 3:
            assert time.monotonic() < give_up
            await asyncio.sleep(0.01)
        running = await micro.get(submitted.batch_id, PRINCIPAL)
        answers.gate.set()
        reply = await done(micro, submitted.batch_id)

    assert running.status == "in_progress"
    assert reply.completed == 10
    assert answers.most_in_flight == 3


async def test_failures_carry_the_status_name_and_crashes_stay_internal(
    backend: Backend, tmp_path: Path
) -> None:
    answers = Answers()
    answers.fail = {
        "item-1": Unavailable("provider for gpt-4o-mini is unreachable"),
        "item-2": RuntimeError("a bug with a secret in it"),
    }
    async with standalone(backend, tmp_path, answers) as (micro, _):
        submitted = await micro.submit(batch_of(3), PRINCIPAL)
        reply = await done(micro, submitted.batch_id)

    assert [r.request_id for r in reply.results] == ["item-0"]
    assert [(f.request_id, f.code) for f in reply.failures] == [
        ("item-1", "UNAVAILABLE"),
        ("item-2", "INTERNAL"),
    ]
    assert reply.failures[0].message == "provider for gpt-4o-mini is unreachable"
    assert "secret" not in reply.failures[1].message


async def test_each_request_runs_in_its_submitters_trace_linked_to_its_batch(
    backend: Backend, tmp_path: Path
) -> None:
    answers = Answers()
    async with standalone(backend, tmp_path, answers) as (micro, spans):
        tracer = TracerProvider().get_tracer("client")
        with tracer.start_as_current_span("client") as client:
            submitted = await micro.submit(batch_of(2), PRINCIPAL)
        await done(micro, submitted.batch_id)

    (batch,) = batch_spans(spans)
    assert batch.context is not None
    requests = [s for s in spans.get_finished_spans() if s.name == "queue.request"]
    assert len(requests) == 2
    submitter = client.get_span_context().span_id
    for span in requests:
        assert span.parent is not None
        assert span.parent.span_id == submitter
        assert [link.context.span_id for link in span.links] == [batch.context.span_id]
    assert [link.context.span_id for link in batch.links] == [submitter]
    assert batch.parent is None, "a batch mixes traces: it is a root linking to them"


async def test_a_full_queue_refuses_more(backend: Backend, tmp_path: Path) -> None:
    async with standalone(backend, tmp_path, Answers(), start=False) as (micro, _):
        await micro.submit(batch_of(6), PRINCIPAL)
        with pytest.raises(ResourceExhausted):
            await micro.submit(batch_of(5, prefix="more"), PRINCIPAL)  # 11 > max_waiting 10
        await micro.submit(batch_of(4, prefix="fits"), PRINCIPAL)


async def test_results_are_kept_result_ttl_seconds(backend: Backend, tmp_path: Path) -> None:
    now = [time.time()]
    path = tmp_path / "queue.toml"
    path.write_text(backend.toml(result_ttl_seconds=60))
    config = load_config(path, env={"COSTMESH_DATA_DIR": str(tmp_path)})
    micro = MicroBatchQueue(config, Answers(), consumer="ttl", clock=lambda: now[0])
    await micro.start()
    try:
        submitted = await micro.submit(batch_of(2), PRINCIPAL)
        await done(micro, submitted.batch_id)
        if backend.name == "redis":  # Redis's own clock keeps time: read the TTLs
            client = redis.Redis.from_url(backend.url)
            try:
                ttls = [
                    client.ttl(f"{backend.prefix}:{kind}:{submitted.batch_id}")
                    for kind in ("batch", "results", "started")
                ]
            finally:
                client.close()
            assert all(0 < ttl <= 60 for ttl in ttls), ttls
        else:
            now[0] += 59
            assert (await micro.get(submitted.batch_id, PRINCIPAL)).completed == 2
            now[0] += 2
            with pytest.raises(NotFound):
                await micro.get(submitted.batch_id, PRINCIPAL)
    finally:
        await micro.stop()


async def test_entries_of_a_consumer_that_died_are_taken_over(
    redis_backend: Backend, tmp_path: Path
) -> None:
    answers = Answers()
    path = tmp_path / "queue.toml"
    path.write_text(redis_backend.toml())
    config = load_config(path, env={"COSTMESH_DATA_DIR": str(tmp_path)})
    submitter = MicroBatchQueue(config, answers, consumer="submit-only")
    submitted = await submitter.submit(batch_of(5), PRINCIPAL)
    await submitter.stop()
    # A consumer reads every entry and dies without answering or acking any.
    stream = f"{redis_backend.prefix}:stream"
    client = redis.Redis.from_url(redis_backend.url)
    try:
        client.xgroup_create(stream, "costmesh", id="0", mkstream=True)
        taken: Any = client.xreadgroup("costmesh", "dead", {stream: ">"}, count=100)
        assert len(taken[0][1]) == 5
        survivor = MicroBatchQueue(config, answers, consumer="survivor", claim_idle_seconds=0.2)
        await survivor.start()
        try:
            reply = await done(survivor, submitted.batch_id)
        finally:
            await survivor.stop()
        pending = client.xpending(stream, "costmesh")["pending"]
    finally:
        client.close()

    assert reply.completed == 5
    assert len(answers.calls) == 5, "each taken over once"
    assert pending == 0


async def test_an_unreachable_redis_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "queue.toml"
    path.write_text(Backend("redis", "redis://127.0.0.1:1/0", "nowhere").toml())
    config = load_config(path, env={"COSTMESH_DATA_DIR": str(tmp_path)})
    micro = MicroBatchQueue(config, Answers(), consumer="offline")
    await micro.start()  # the mesh still starts; the consumer keeps trying
    try:
        with pytest.raises(Unavailable):
            await micro.submit(batch_of(1), PRINCIPAL)
    finally:
        await micro.stop()


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ('backend = "kafka"', "queue.backend"),
        ("max_batch = 0", "queue.max_batch"),
        ("max_batch = 20000", "queue.max_batch"),
        ("max_wait_ms = -1", "queue.max_wait_ms"),
        ('concurrency = "many"', "queue.concurrency"),
        ("result_ttl_seconds = 0", "queue.result_ttl_seconds"),
        ('backend = "redis"\nredis_url = "http://127.0.0.1:6379"', "queue.redis_url"),
        ('redis_prefix = ""', "queue.redis_prefix"),
    ],
)
def test_bad_settings_name_their_key(setting: str, key: str, tmp_path: Path) -> None:
    path = tmp_path / "queue.toml"
    path.write_text(f"[queue]\n{setting}\n")
    config = load_config(path, env={"COSTMESH_DATA_DIR": str(tmp_path)})

    with pytest.raises(ConfigError, match=rf"^{key}: "):
        MicroBatchQueue(config, Answers())
