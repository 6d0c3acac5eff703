"""Inference dispatch: the mesh's own overhead on a cache miss, and a flaky provider.

overhead: the whole mesh in this process (cache, router, ledger, inference) on the
embedded defaults, the provider a loopback simulator answering at once. Each call is
a new question (a cache miss: embedding, search, routing, provider, store, ledger).
Overhead = the client's Complete latency minus the provider call's own span, from
the trace. At 1 and at 32 concurrent callers.

flaky: the planned model's provider fails 30% of calls (500 or 429, at random); its
fallback is a healthy deployment. 1,000 Complete calls; every failure the client
sees is counted.

    .venv/bin/python bench/dispatch.py overhead --calls 1000
    .venv/bin/python bench/dispatch.py flaky --calls 1000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_trace_id

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from services import SERVICES
from services.common.config import load_config
from services.mesh import start_mesh

KEY = (("authorization", "Bearer cm-demo-admin-key"),)
PROVIDER_KEY = "sk-bench"
FLAKY = """
[inference]
retry_base_seconds = 0.02
retry_max_seconds = 0.2

[providers.flaky]
base_url = "{flaky}"
api_key_env = "OPENAI_API_KEY"

[models."gpt-4o-mini-flaky"]
provider = "flaky"
context_window = 128000
input_usd_per_mtok = "0.15"
cached_input_usd_per_mtok = "0.075"
output_usd_per_mtok = "0.60"
fallbacks = ["gpt-4o-mini"]

[features.support]
router = "rules"
cache_mode = "off"
models.simple = "gpt-4o-mini-flaky"
"""

# A feature that does no model work of its own: no cache, a fixed tier.
PLAIN = """
[features.support]
router = "rules"
cache_mode = "off"
"""


def _request(i: int) -> inference_pb2.CompleteRequest:
    text = f"Question number {i}: how do I change the address on my order {i * 7919}?"
    return inference_pb2.CompleteRequest(
        feature="support",
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
    )


async def _mesh(
    simulator: OpenAISimulator, data_dir: str, config_text: str, spans: InMemorySpanExporter
) -> tuple[object, str]:
    config_path = Path(data_dir) / "bench.toml"
    config_path.write_text(config_text)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    env = {
        "OPENAI_API_KEY": PROVIDER_KEY,
        "OPENAI_BASE_URL": simulator.base_url,
        "COSTMESH_DATA_DIR": data_dir,
        "COSTMESH_LOG_LEVEL": "WARNING",
    }
    running = await start_mesh(load_config(config_path, env=env), env, SERVICES, provider, port=0)
    return running, f"127.0.0.1:{running.port}"


def _cuts(values: list[float]) -> str:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return f"p50 {cuts[49] * 1000:6.2f} ms  p99 {cuts[98] * 1000:6.2f} ms"


async def _overhead(calls: int, concurrency: int, config_text: str, interval: float) -> None:
    spans = InMemorySpanExporter()
    with OpenAISimulator(api_key=PROVIDER_KEY) as simulator, tempfile.TemporaryDirectory() as d:
        running, address = await _mesh(simulator, d, config_text, spans)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                for i in range(20):  # warm-up: model, connections
                    await stub.Complete(_request(10**6 + i), metadata=KEY, timeout=30)
                spans.clear()
                latencies: dict[str, float] = {}

                async def worker(indices: range) -> None:
                    for i in indices:
                        started = time.perf_counter()
                        reply = await stub.Complete(_request(i), metadata=KEY, timeout=30)
                        latencies[reply.trace_id] = time.perf_counter() - started
                        assert not reply.cached
                        await asyncio.sleep(interval)  # a caller's pace, not a sync point

                share = calls // concurrency
                await asyncio.gather(
                    *(worker(range(w * share, (w + 1) * share)) for w in range(concurrency))
                )
        finally:
            await running.stop(grace=5)  # type: ignore[attr-defined]
    provider_time: defaultdict[str, float] = defaultdict(float)
    for span in spans.get_finished_spans():
        if span.name.startswith("chat ") and span.end_time and span.start_time:
            trace_id = format_trace_id(span.context.trace_id)
            provider_time[trace_id] += (span.end_time - span.start_time) / 1e9
    overheads = [latencies[t] - provider_time[t] for t in latencies if t in provider_time]
    provider = [provider_time[t] for t in latencies if t in provider_time]
    print(f"cache-miss Complete, {len(overheads)} calls, {concurrency} concurrent callers")
    print(f"  mesh overhead   {_cuts(overheads)}")
    print(f"  provider call   {_cuts(provider)}")
    print(f"  whole Complete  {_cuts(list(latencies.values()))}")
    _print_breakdown(spans, set(latencies))


def _print_breakdown(spans: InMemorySpanExporter, traces: set[str]) -> None:
    """Median duration of each kind of span in the measured calls: where the time goes."""
    durations: defaultdict[str, list[float]] = defaultdict(list)
    for span in spans.get_finished_spans():
        if span.end_time and span.start_time and format_trace_id(span.context.trace_id) in traces:
            kind = "chat" if span.name.startswith("chat ") else span.name
            durations[f"{span.kind.name.lower():8} {kind}"].append(
                (span.end_time - span.start_time) / 1e9
            )
    print("  median span durations (ms):")
    for name, values in sorted(durations.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"    {statistics.median(values) * 1000:7.2f}  {name}  (n={len(values)})")


async def _flaky(calls: int, concurrency: int) -> None:
    spans = InMemorySpanExporter()
    with (
        OpenAISimulator(api_key=PROVIDER_KEY) as healthy,
        OpenAISimulator(api_key=PROVIDER_KEY) as flaky,
        tempfile.TemporaryDirectory() as d,
    ):
        flaky.set_failure_rate(0.3, statuses=(500, 503, 429), seed=1)
        running, address = await _mesh(healthy, d, FLAKY.format(flaky=flaky.base_url), spans)
        outcomes: Counter[str] = Counter()
        attempts: Counter[int] = Counter()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)

                async def worker(indices: range) -> None:
                    for i in indices:
                        try:
                            reply = await stub.Complete(_request(i), metadata=KEY, timeout=30)
                        except grpc.aio.AioRpcError as exc:
                            outcomes[f"failed {exc.code().name}"] += 1
                            continue
                        outcomes["fallback" if reply.fallback else "planned model"] += 1
                        attempts[reply.attempts] += 1

                share = calls // concurrency
                await asyncio.gather(
                    *(worker(range(w * share, (w + 1) * share)) for w in range(concurrency))
                )
        finally:
            await running.stop(grace=5)  # type: ignore[attr-defined]
    failed_tries = sum(
        1 for s in spans.get_finished_spans() if s.name.startswith("chat ") and not s.status.is_ok
    )
    print(f"{calls} Complete calls, provider failing 30% (500/503/429), healthy fallback")
    print(f"  answered by: {dict(outcomes)}")
    print(f"  tries per call: {dict(sorted(attempts.items()))}; failed tries: {failed_tries}")
    failures = sum(v for k, v in outcomes.items() if k.startswith("failed"))
    print(f"  failures seen by the client: {failures}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("overhead", "flaky"))
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="*", default=None)
    parser.add_argument(
        "--interval-ms",
        type=float,
        default=0.0,
        help="each caller's pause between calls (0: back to back, a stress test)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="overhead of a feature without the semantic cache and with a fixed route",
    )
    args = parser.parse_args()
    if args.mode == "overhead":
        for concurrency in args.concurrency or [1, 32]:
            config = PLAIN if args.plain else ""
            asyncio.run(_overhead(args.calls, concurrency, config, args.interval_ms / 1000))
    else:
        asyncio.run(_flaky(args.calls, (args.concurrency or [8])[0]))


if __name__ == "__main__":
    main()
