"""Gateway cost side by side: costmesh (and the LiteLLM proxy, when installed) in front
of one loopback fake provider.

Each gateway runs as its own process; the fake provider (instant answers) runs in
another, so the CPU counted is the gateway's alone (/proc/<pid>/stat, user + system).
Gateways are measured in turn, round after round (interleaved), and each figure is
the median over rounds.

  miss, 1 caller     every call a new question: added latency p50/p99, CPU per miss
  miss, 32 callers   misses answered per second
  exact hit          one question asked again: latency p50, CPU per hit, hits/s at 32
                     (only for a gateway that caches; the LiteLLM proxy here does not)

costmesh runs twice: its default feature (semantic cache, embedding router) and a
plain feature (no cache, rules router). LiteLLM: pass --litellm PATH to its `litellm`
command (pinned 1.110.2; see bench/NOTES.md for how it was installed).

    .venv/bin/python bench/gateway.py --calls 300 --rounds 3
    .venv/bin/python bench/gateway.py --litellm /tmp/litellm-venv/bin/litellm
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.types.v1 import types_pb2

KEY = "cm-demo-admin-key"
PROVIDER_KEY = "sk-bench"
CALLERS = 32
TICKS = os.sysconf("SC_CLK_TCK")

COSTMESH_CONFIG = """
[server]
data_dir = "{data_dir}"

[providers.openai]
base_url = "{provider}"

[features.plain]
router = "rules"
cache_mode = "off"
"""

LITELLM_CONFIG = """
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: {provider}
      api_key: {key}
general_settings:
  master_key: sk-litellm-bench
"""

PROVIDER_SCRIPT = """
import sys, threading
from costmesh_simulator import OpenAISimulator
sim = OpenAISimulator(api_key=sys.argv[1])
print(sim.start(), flush=True)
threading.Event().wait()
"""


def _question(i: int) -> str:
    return f"Question {i}: how do I change the delivery address on my order {i * 7919}?"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


async def _read_line(process: asyncio.subprocess.Process, prefix: str) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(120):
        while line := (await process.stdout.readline()).decode():
            if line.startswith(prefix):
                return line.strip()
    raise RuntimeError(f"process exited with {await process.wait()} before {prefix!r}")


@contextlib.asynccontextmanager
async def _process(*argv: str, env: dict[str, str], ready: str) -> AsyncIterator[tuple[int, str]]:
    """Run argv; yield its pid and the first line starting with `ready` ("" waits for none)."""
    stdout = asyncio.subprocess.PIPE if ready else asyncio.subprocess.DEVNULL
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=stdout, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        line = await _read_line(process, ready) if ready else ""
        yield process.pid, line
    finally:
        process.terminate()
        await process.wait()


Ask = Callable[[int], Awaitable[bool]]  # question number -> whether it was a cache hit


@dataclass
class Gateway:
    name: str
    pid: int
    ask: Ask


@contextlib.asynccontextmanager
async def _costmesh(provider: str, data_dir: str, feature: str) -> AsyncIterator[Gateway]:
    config = Path(data_dir) / "bench.toml"
    config.write_text(COSTMESH_CONFIG.format(data_dir=data_dir, provider=provider))
    # No HTTP port: two meshes run side by side, and the bench calls gRPC.
    env = {**os.environ, "OPENAI_API_KEY": PROVIDER_KEY, "COSTMESH_LOG_LEVEL": "WARNING",
           "COSTMESH_HTTP_PORT": "0"}  # fmt: skip
    argv = (
        sys.executable,
        "-m",
        "costmesh_tools.cli",
        "serve",
        "--port",
        "0",
        "--config",
        str(config),
    )
    async with _process(*argv, env=env, ready="costmesh: serving") as (pid, line):
        address = line.rsplit(" ", 1)[1]
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            metadata = (("authorization", f"Bearer {KEY}"),)

            async def ask(i: int) -> bool:
                request = inference_pb2.CompleteRequest(
                    feature=feature,
                    messages=[
                        types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=_question(i))
                    ],
                )
                reply = await stub.Complete(request, metadata=metadata, timeout=30)
                return reply.cached

            yield Gateway(f"costmesh {feature}", pid, ask)


@contextlib.asynccontextmanager
async def _litellm(command: str, provider: str, data_dir: str) -> AsyncIterator[Gateway]:
    config = Path(data_dir) / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(provider=provider, key=PROVIDER_KEY))
    port = 40000 + os.getpid() % 20000
    # Offline: the proxy's bundled price map instead of fetching one.
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    argv = (command, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1")  # fmt: skip
    async with _process(*argv, env=env, ready="") as (pid, _):
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-litellm-bench", max_retries=0
        )

        async def ask(i: int) -> bool:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": _question(i)}]
            )
            return False

        async with asyncio.timeout(120):
            while True:  # the proxy prints before it listens
                with contextlib.suppress(openai.APIConnectionError):
                    await ask(0)
                    break
                await asyncio.sleep(0.5)
        try:
            yield Gateway("litellm proxy", pid, ask)
        finally:
            await client.close()


async def _run(
    gateway: Gateway, numbers: list[int], callers: int
) -> tuple[list[float], float, float]:
    """Latencies, CPU seconds and wall seconds of asking `numbers` with `callers` at once."""
    latencies: list[float] = []
    queue = iter(numbers)

    async def caller() -> None:
        for i in queue:
            started = time.perf_counter()
            await gateway.ask(i)
            latencies.append(time.perf_counter() - started)

    cpu, wall = _cpu_seconds(gateway.pid), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies, _cpu_seconds(gateway.pid) - cpu, time.perf_counter() - wall


async def _measure(gateway: Gateway, calls: int, first: int) -> dict[str, float]:
    """One round on one gateway; question numbers from `first` are new to it."""
    for i in range(10):  # warm-up: model sessions, connections
        await gateway.ask(first + calls * 3 + i)
    fresh = list(range(first, first + calls))
    miss, miss_cpu, _ = await _run(gateway, fresh, 1)
    burst = list(range(first + calls, first + calls * 3))
    _, _, miss_wall = await _run(gateway, burst, CALLERS)
    cuts = statistics.quantiles(miss, n=100, method="inclusive")
    figures = {
        "miss p50 ms": cuts[49] * 1000,
        "miss p99 ms": cuts[98] * 1000,
        "CPU per miss ms": miss_cpu / calls * 1000,
        "misses/s at 32": len(burst) / miss_wall,
    }
    if not await gateway.ask(first):  # asked before: a gateway that caches has it now
        return figures
    hit, hit_cpu, _ = await _run(gateway, [first] * calls, 1)
    _, _, hit_wall = await _run(gateway, [first] * (calls * 2), CALLERS)
    figures |= {
        "hit p50 ms": statistics.median(hit) * 1000,
        "CPU per hit ms": hit_cpu / calls * 1000,
        "hits/s at 32": calls * 2 / hit_wall,
    }
    return figures


async def main_async(calls: int, rounds: int, litellm: str | None) -> None:
    env = {**os.environ, "COSTMESH_LOG_LEVEL": "WARNING"}
    argv = (sys.executable, "-c", PROVIDER_SCRIPT, PROVIDER_KEY)
    async with _process(*argv, env=env, ready="http") as (_, provider):
        with tempfile.TemporaryDirectory() as data_dir:
            async with contextlib.AsyncExitStack() as stack:
                gateways = []
                for feature in ("default", "plain"):
                    folder = Path(data_dir) / feature
                    folder.mkdir()
                    gateways.append(
                        await stack.enter_async_context(_costmesh(provider, str(folder), feature))
                    )
                if litellm:
                    gateways.append(
                        await stack.enter_async_context(_litellm(litellm, provider, data_dir))
                    )
                results: dict[str, defaultdict[str, list[float]]] = {
                    g.name: defaultdict(list) for g in gateways
                }
                for r in range(rounds):
                    for gateway in gateways:
                        figures = await _measure(gateway, calls, first=(r + 1) * 10**6)
                        for measure, value in figures.items():
                            results[gateway.name][measure].append(value)
    _print(results)


def _print(results: dict[str, defaultdict[str, list[float]]]) -> None:
    names = list(results)
    measures = list(dict.fromkeys(m for figures in results.values() for m in figures))
    medians = {n: {m: statistics.median(v) for m, v in results[n].items()} for n in names}
    print("| measure | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    reference = "litellm proxy" if "litellm proxy" in names else None
    for measure in measures:
        cells = []
        for name in names:
            value = medians[name].get(measure)
            cell = "" if value is None else f"{value:.1f}"
            base = medians.get(reference or "", {}).get(measure)
            if value is not None and base and name != reference:
                cell += f" ({value / base:.2f}x)"
            cells.append(cell)
        print(f"| {measure} | " + " | ".join(cells) + " |")
    print(json.dumps({n: dict(results[n]) for n in names}), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per measure per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--litellm", help="path to the `litellm` command (proxy 1.110.2)")
    args = parser.parse_args()
    asyncio.run(main_async(args.calls, args.rounds, args.litellm))


if __name__ == "__main__":
    main()
