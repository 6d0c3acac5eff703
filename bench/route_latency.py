"""Latency of RouterService.Route over gRPC, with the question's vector supplied and without.

Starts `costmesh serve router` as a subprocess on the embedded defaults (the shipped
embedding classifier), then times Route from one gRPC client on Banking77 test
questions: once handing over the all-MiniLM-L6-v2 vector the cache would have
computed (the router only classifies), once without (the router embeds first).
Targets: p50 <= 3 ms with the vector, <= 10 ms without.

    .venv/bin/python bench/route_latency.py --calls 1000
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from costmesh.router.v1 import router_pb2, router_pb2_grpc
from costmesh.types.v1 import types_pb2
from services.common.embedding import shared_encoder

KEY = (("authorization", "Bearer cm-demo-admin-key"),)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "banking77" / "test.csv"


async def _start_router() -> tuple[asyncio.subprocess.Process, str]:
    env = {**os.environ, "COSTMESH_LOG_LEVEL": "WARNING", "COSTMESH_SERVICE_KEY": "bench-key"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "costmesh_tools.cli", "serve", "router", "--port", "0",
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(60):
        while line := (await process.stdout.readline()).decode():
            if line.startswith("costmesh: serving router on "):
                return process, line.rsplit(" ", 1)[1].strip()
    raise RuntimeError("the router did not start")


def _request(text: str, vector: Sequence[float] = ()) -> router_pb2.RouteRequest:
    return router_pb2.RouteRequest(
        feature="support",
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
        embedding=vector,
        embedding_model=shared_encoder(None, 1).model if vector else "",
    )


async def _time(
    stub: router_pb2_grpc.RouterServiceAsyncStub, requests: list[router_pb2.RouteRequest]
) -> list[float]:
    for request in requests[:50]:  # warm-up: connection, model, caches
        await stub.Route(request, metadata=KEY, timeout=10)
    latencies = []
    for request in requests:
        started = time.perf_counter()
        await stub.Route(request, metadata=KEY, timeout=10)
        latencies.append(time.perf_counter() - started)
    return latencies


def _line(name: str, latencies: list[float]) -> str:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return (
        f"{name:<22} p50 {cuts[49] * 1000:6.2f} ms  p90 {cuts[89] * 1000:6.2f} ms  "
        f"p99 {cuts[98] * 1000:6.2f} ms  ({len(latencies)} calls)"
    )


async def _run(calls: int) -> None:
    with DATA.open(newline="", encoding="utf-8") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)][:calls]
    vectors = shared_encoder(None, 1).embed_sync(texts).vectors.tolist()
    process, address = await _start_router()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            supplied = await _time(
                stub, [_request(t, v) for t, v in zip(texts, vectors, strict=True)]
            )
            embedded = await _time(stub, [_request(t) for t in texts])
    finally:
        process.terminate()
        await process.wait()
    print(f"Route over gRPC, one caller, `costmesh serve router` on {os.cpu_count()} cores")
    print(_line("vector supplied", supplied))
    print(_line("router embeds", embedded))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(_run(args.calls))


if __name__ == "__main__":
    main()
