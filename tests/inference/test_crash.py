"""Killing inference mid-run (SIGKILL, no shutdown) loses no usage that a caller saw
answered and counts nothing twice, whatever the ledger's store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections import Counter
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh_simulator import OpenAISimulator
from services.common.config import load_config
from services.mesh import start_mesh
from tests.conftest import AUTH, PROVIDER_KEY, mesh_env, user_request
from tests.postgres import fresh_schema
from tests.processes import start_service

SERVICE_KEY = "cm-test-service-key"


async def _ledger_rows(address: str) -> list[ledger_pb2.UsageRecord]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        stream = stub.ExportUsage(ledger_pb2.ExportUsageRequest(), metadata=AUTH, timeout=10)
        return [item.record async for item in stream]


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_a_killed_inference_loses_no_answered_usage_and_duplicates_nothing(
    store: str, simulator: OpenAISimulator, tmp_path: Path
) -> None:
    with contextlib.ExitStack() as stack:
        env = {**mesh_env(simulator, tmp_path / "peers"), "COSTMESH_SERVICE_KEY": SERVICE_KEY}
        if store == "postgres":
            env["LEDGER_DATABASE"] = stack.enter_context(fresh_schema())
        config = load_config(env=env)
        peers = await start_mesh(config, env, ["cache", "router"], TracerProvider(), port=0)
        ledger = await start_mesh(config, env, ["ledger"], TracerProvider(), port=0)
        ledger_port = ledger.port
        address, ledger_address = f"127.0.0.1:{peers.port}", f"127.0.0.1:{ledger_port}"
        front_env = {
            **os.environ, **env, "OPENAI_API_KEY": PROVIDER_KEY,
            "COSTMESH_DATA_DIR": str(tmp_path / "inference"),
            "CACHE_ADDR": address, "ROUTER_ADDR": address, "LEDGER_ADDR": ledger_address,
        }  # fmt: skip
        try:
            # The ledger is down while inference answers, so usage waits in the
            # outbox when inference is killed.
            await ledger.stop(grace=0)
            simulator.set_latency(0.3)
            process, front = await start_service("inference", front_env)
            requests = [user_request(f"question {i}", request_id=f"req-{i}") for i in range(12)]
            answered = await _send_and_kill(front, requests, process)
            simulator.set_latency(0)
            ledger = await start_mesh(config, env, ["ledger"], TracerProvider(), port=ledger_port)
            process, front = await start_service("inference", front_env)  # the same outbox on disk
            async with grpc.aio.insecure_channel(front) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                retried = [await stub.Complete(r, metadata=AUTH, timeout=10) for r in requests]
            process.send_signal(signal.SIGTERM)  # a clean stop flushes what is left
            assert await process.wait() == 0
            rows = await _ledger_rows(ledger_address)
        finally:
            await peers.stop(grace=1)
            await ledger.stop(grace=1)

    by_trace = {r.trace_id: r for r in rows}
    provider_calls = [r for r in rows if r.provider == "openai"]
    # Responses already on the wire when the kill lands are answered too: at least 4.
    assert len(answered) >= 4, "calls were answered before the kill"
    # Priced by the front although the ledger was down: their rows were in the outbox.
    assert all(not a.cost_pending and a.cost_nano_usd > 0 for a in answered)
    assert all(a.trace_id in by_trace for a in answered), "an answered call went unrecorded"
    replayed = {a.request_id: a.trace_id for a in answered}
    assert all(replayed[r.request_id] == r.trace_id for r in retried if r.request_id in replayed)
    # An answered request is replayed, never run (or billed) again: its response was
    # remembered in the transaction that wrote its rows. One the kill cut off after
    # the provider answered but before that transaction is run again by the retry, or
    # finds its answer in the cache (stored meanwhile); the first provider call of
    # such a request was paid and is not billed.
    per_request = [r.client_request_id for r in provider_calls]
    assert all(per_request.count(a.request_id) == 1 for a in answered)
    recorded = {r.client_request_id for r in rows}
    assert recorded == {r.request_id for r in requests}, "every request recorded"
    assert len(provider_calls) <= simulator.call_count, "no record without a provider call"
    assert all(r.trace_id in by_trace for r in retried), "every retry's answer is recorded"


async def _send_and_kill(
    front: str, requests: list[inference_pb2.CompleteRequest], process: asyncio.subprocess.Process
) -> list[inference_pb2.CompleteResponse]:
    """Send all at once; SIGKILL inference once a few have been answered."""
    answered: list[inference_pb2.CompleteResponse] = []
    async with grpc.aio.insecure_channel(front) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        calls = [
            asyncio.ensure_future(stub.Complete(r, metadata=AUTH, timeout=10)) for r in requests
        ]
        for call in asyncio.as_completed(calls):
            with contextlib.suppress(grpc.aio.AioRpcError):
                answered.append(await call)
            if len(answered) == 4 and process.returncode is None:
                process.send_signal(signal.SIGKILL)
                await process.wait()
        await asyncio.gather(*calls, return_exceptions=True)
    return answered


KILLS = 12  # bench/faults.py runs many more (`sigkill --kills 100`)


async def test_repeated_kills_under_load_bill_each_answered_request_exactly_once(
    simulator: OpenAISimulator, tmp_path: Path
) -> None:
    """Inference is killed at random points while callers retry their request ids
    against an instant provider: each request ends with one answer row, no row is
    left without an answered request, and replies' costs are the rows' to the nano."""
    env = {**mesh_env(simulator, tmp_path / "peers"), "COSTMESH_SERVICE_KEY": SERVICE_KEY}
    config = load_config(env=env)
    peers = await start_mesh(config, env, ["cache", "router", "ledger"], TracerProvider(), port=0)
    address = f"127.0.0.1:{peers.port}"
    front_env = {
        **os.environ, **env, "COSTMESH_DATA_DIR": str(tmp_path / "inference"),
        "CACHE_ADDR": address, "ROUTER_ADDR": address, "LEDGER_ADDR": address,
    }  # fmt: skip
    requests = {f"req-{i}": user_request(f"Order {i}: where is it?", request_id=f"req-{i}")
                for i in range(200)}  # fmt: skip
    replies: dict[str, list[inference_pb2.CompleteResponse]] = {}
    cut: list[str] = []  # request ids whose call a kill cut off
    rng = random.Random(20261206)
    try:
        for _ in range(KILLS):
            process, front = await start_service("inference", front_env)
            cut += await _call_until_killed(
                front, requests, replies, process, rng.uniform(0.05, 0.5)
            )
        process, front = await start_service("inference", front_env)
        async with grpc.aio.insecure_channel(front) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for request_id, request in requests.items():
                reply = await stub.Complete(request, metadata=AUTH, timeout=10)
                replies.setdefault(request_id, []).append(reply)
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
        rows = await _ledger_rows(address)
    finally:
        await peers.stop(grace=1)

    answers = Counter(
        r.client_request_id for r in rows if r.purpose == ledger_pb2.CALL_PURPOSE_ANSWER
    )
    assert {k: n for k, n in answers.items() if n != 1} == {}, "an answer billed twice"
    assert set(answers) == set(requests), "no row without its request, no request unbilled"
    for request_id, seen in replies.items():
        assert len({r.trace_id for r in seen}) == 1, f"{request_id} answered twice"
        billed = sum(r.cost_nano_usd for r in rows if r.client_request_id == request_id)
        assert billed == seen[0].cost_nano_usd  # 0 for a retry the cache answered
    assert cut, "the kills cut calls under way"


async def _call_until_killed(
    front: str,
    requests: dict[str, inference_pb2.CompleteRequest],
    replies: dict[str, list[inference_pb2.CompleteResponse]],
    process: asyncio.subprocess.Process,
    after: float,
) -> list[str]:
    """Eight callers ask (and ask again) for the unanswered requests, and some of the
    answered ones; SIGKILL lands `after` seconds after the first answer (once warm).
    Returns the request ids whose call failed (cut by the kill)."""
    failed: list[str] = []
    async with grpc.aio.insecure_channel(front) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        queue = [r for r in requests if r not in replies] + list(replies)[:20]

        async def caller() -> None:
            while queue:
                request_id = queue.pop(0)
                try:
                    reply = await stub.Complete(requests[request_id], metadata=AUTH, timeout=5)
                except grpc.aio.AioRpcError:
                    failed.append(request_id)
                    continue
                replies.setdefault(request_id, []).append(reply)
                warm.set()

        warm = asyncio.Event()
        callers = [asyncio.ensure_future(caller()) for _ in range(8)]
        async with asyncio.timeout(30):
            await warm.wait()
        await asyncio.sleep(after)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        await asyncio.gather(*callers, return_exceptions=True)
    return failed
