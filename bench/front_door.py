"""What the OpenAI-compatible HTTP front door adds to an exact cache hit, over gRPC Complete.

Starts `costmesh serve` (embedded defaults, simulated provider) with the HTTP port on,
warms one answer, then times the same exact hit through gRPC `Complete` and through
`POST /v1/chat/completions` (plain HTTP/1.1 with keep-alive, and the `openai` SDK),
interleaved in rounds so both see the same machine. Also reads the server's CPU time
per call from /proc for each path.

    .venv/bin/python bench/front_door.py --calls 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

import grpc
import httpx2 as httpx
from cache_hit_latency import _start_mesh
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.types.v1 import types_pb2

KEY = "cm-demo-admin-key"
QUESTION = "Reset password?"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: PTH123, SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _timed(
    call: Callable[[], Awaitable[None]], calls: int, pid: int
) -> tuple[list[float], float]:
    latencies = []
    cpu = _cpu_seconds(pid)
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    return latencies, (_cpu_seconds(pid) - cpu) / calls


async def _run(calls: int, rounds: int) -> None:
    http_port = _free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        process, address = await _start_mesh(data_dir, "--http-port", str(http_port))
        try:
            async with (
                grpc.aio.insecure_channel(address) as channel,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}/v1") as http,
                AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=KEY) as sdk,
            ):
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                request = inference_pb2.CompleteRequest(
                    feature="support",
                    messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=QUESTION)],
                )
                messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
                body = {"model": "auto", "messages": messages}
                headers = {"authorization": f"Bearer {KEY}", "x-costmesh-feature": "support"}

                async def miss() -> None:
                    await stub.Complete(
                        request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=10
                    )

                async def via_grpc() -> None:
                    reply = await stub.Complete(
                        request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=10
                    )
                    assert reply.cached

                async def via_http() -> None:
                    reply = await http.post("/chat/completions", json=body, headers=headers)
                    assert reply.headers["x-costmesh-cached"] == "true"

                async def via_sdk() -> None:
                    await sdk.chat.completions.create(
                        model="auto",
                        messages=messages,
                        extra_headers={"x-costmesh-feature": "support"},
                    )

                await miss()
                paths = {"gRPC Complete": via_grpc, "HTTP, plain client": via_http,
                         "HTTP, openai SDK": via_sdk}  # fmt: skip
                for call in paths.values():  # warm every path
                    await _timed(call, 50, process.pid)
                seen: dict[str, list[float]] = {name: [] for name in paths}
                cpu: dict[str, list[float]] = {name: [] for name in paths}
                for _ in range(rounds):
                    for name, call in paths.items():
                        latencies, per_call = await _timed(call, calls // rounds, process.pid)
                        seen[name] += latencies
                        cpu[name].append(per_call)
        finally:
            process.terminate()
            await process.wait()
    print(f"exact cache hit, {calls} calls per path in {rounds} interleaved rounds, 1 caller")
    print("| path | p50 ms | p99 ms | server CPU per call ms |")
    print("|---|---:|---:|---:|")
    for name, latencies in seen.items():
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        print(f"| {name} | {cuts[49] * 1000:.2f} | {cuts[98] * 1000:.2f} | "
              f"{statistics.median(cpu[name]) * 1000:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(_run(args.calls, args.rounds))


if __name__ == "__main__":
    main()
