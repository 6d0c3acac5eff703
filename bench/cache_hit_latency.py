"""Latency of a cache-hit Complete through the one-process mesh (`costmesh serve`).

Starts the mesh as a subprocess on the embedded defaults (simulated provider, SQLite
ledger in a temporary folder), warms the cache with one miss, then times N identical
calls from one gRPC client and prints p50/p90/p99. Every hit still writes its usage
row to the ledger, as in production.

    .venv/bin/python bench/cache_hit_latency.py --calls 2000 --concurrency 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

import grpc

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.types.v1 import types_pb2

KEY = (("authorization", "Bearer cm-demo-admin-key"),)


async def _start_mesh(data_dir: str, *extra: str) -> tuple[asyncio.subprocess.Process, str]:
    """`costmesh serve` on the embedded defaults (simulated provider), `extra` its
    further options; returns the process and its gRPC address."""
    env = {**os.environ, "COSTMESH_DATA_DIR": data_dir, "COSTMESH_LOG_LEVEL": "WARNING"}
    env.pop("OPENAI_API_KEY", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "costmesh_tools.cli", "serve", "--port", "0", *extra,
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(30):
        while line := (await process.stdout.readline()).decode():
            if line.startswith("costmesh: serving all on "):
                return process, line.rsplit(" ", 1)[1].strip()
    raise RuntimeError("the mesh did not start")


async def _run(calls: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        process, address = await _start_mesh(data_dir)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                request = inference_pb2.CompleteRequest(
                    feature="support",
                    messages=[
                        types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Reset password?")
                    ],
                )
                await stub.Complete(request, metadata=KEY, timeout=10)  # the one miss
                latencies: list[float] = []

                async def worker(count: int) -> None:
                    for _ in range(count):
                        started = time.perf_counter()
                        reply = await stub.Complete(request, metadata=KEY, timeout=10)
                        latencies.append(time.perf_counter() - started)
                        assert reply.cached, "every timed call must be a cache hit"

                began = time.perf_counter()
                base, extra = divmod(calls, concurrency)
                shares = [base + (i < extra) for i in range(concurrency)]
                await asyncio.gather(*(worker(n) for n in shares))
                elapsed = time.perf_counter() - began
        finally:
            process.terminate()
            await process.wait()
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    print(f"cache-hit Complete, one-process mesh: {calls} calls, concurrency {concurrency}")
    print(
        f"p50 {cuts[49] * 1000:.2f} ms  p90 {cuts[89] * 1000:.2f} ms  "
        f"p99 {cuts[98] * 1000:.2f} ms  max {max(latencies) * 1000:.2f} ms  "
        f"throughput {calls / elapsed:.0f} calls/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(_run(args.calls, args.concurrency))


if __name__ == "__main__":
    main()
