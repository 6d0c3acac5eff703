"""Semantic and exact Lookup latency over gRPC against a cache holding N entries.

Starts `costmesh serve cache` as a subprocess (in-process store, local MiniLM on
ONNX Runtime), fills one partition with N entries through Store (Banking77 train
questions, then perturbed copies of their vectors up to N, so the index holds N
realistic vectors), then times from one gRPC client:

- semantic lookups: Banking77 test questions, never stored (embedding + search);
- exact hits: questions that were stored verbatim;
- throughput of semantic lookups with `--concurrency` callers;
- the server's memory: resident set growth while filling, and the cache's own
  accounting (GetStats.memory_bytes).

    .venv/bin/python bench/semantic_lookup.py --entries 100000
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.types.v1 import types_pb2
from services.common.embedding import normalise, shared_encoder

SERVICE_KEY = "bench-service-key"
AUTH = (("authorization", f"Bearer {SERVICE_KEY}"),)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "banking77"


def _texts(split: str) -> list[str]:
    with (DATA / f"{split}.csv").open(newline="") as fh:
        return [row["text"] for row in csv.DictReader(fh)]


async def _start_cache(
    data_dir: str, entries: int, threads: int
) -> tuple[asyncio.subprocess.Process, str]:
    config = Path(data_dir) / "bench.toml"
    config.write_text(f"[cache]\nmax_entries = {entries * 2}\nembedding_threads = {threads}\n")
    env = {
        **os.environ,
        "COSTMESH_DATA_DIR": data_dir,
        "COSTMESH_CONFIG": str(config),
        "COSTMESH_SERVICE_KEY": SERVICE_KEY,
        "COSTMESH_LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "costmesh_tools.cli", "serve", "cache", "--port", "0",
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(120):
        while line := (await process.stdout.readline()).decode():
            if line.startswith("costmesh: serving cache on "):
                return process, line.rsplit(" ", 1)[1].strip()
    raise RuntimeError("the cache did not start")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _key(text: str) -> cache_pb2.CacheKey:
    return cache_pb2.CacheKey(
        team="bench",
        feature="support",
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
    )


def _corpus(entries: int) -> tuple[list[str], np.ndarray]:
    """N (question, vector) pairs: real questions first, then perturbed copies."""
    texts = _texts("train")
    vectors = shared_encoder(None, 2).embed_sync(texts).vectors
    rng = np.random.default_rng(7)
    questions, rows = list(texts[:entries]), [vectors[:entries]]
    copy = 0
    while len(questions) < entries:
        take = min(len(texts), entries - len(questions))
        noise = rng.normal(0, 0.02, size=(take, vectors.shape[1])).astype(np.float32)
        rows.append(normalise(vectors[:take] + noise))
        copy += 1
        suffix = " " + "".join(chr(97 + int(d)) for d in np.base_repr(copy, 26))
        questions.extend(t + suffix.lower() for t in texts[:take])
    return questions, np.vstack(rows)


async def _fill(stub: cache_pb2_grpc.CacheServiceAsyncStub, entries: int) -> float:
    questions, vectors = _corpus(entries)
    began = time.perf_counter()
    limit = asyncio.Semaphore(64)

    async def store(i: int) -> None:
        async with limit:
            await stub.Store(
                cache_pb2.StoreRequest(
                    key=_key(questions[i]),
                    content=f"answer {i}",
                    finish_reason="stop",
                    query_embedding=vectors[i].tolist(),
                    embedding_model=shared_encoder(None, 2).model,
                ),
                metadata=AUTH,
                timeout=30,
            )

    await asyncio.gather(*(store(i) for i in range(entries)))
    return entries / (time.perf_counter() - began)


async def _timed(
    call: Callable[[str], Awaitable[object]], texts: list[str], concurrency: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = list(texts)

    async def worker() -> None:
        while queue:
            text = queue.pop()
            started = time.perf_counter()
            await call(text)
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, len(texts) / (time.perf_counter() - began)


def _report(name: str, latencies: list[float], throughput: float) -> None:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    print(
        f"{name:<34} p50 {cuts[49] * 1000:6.2f} ms  p99 {cuts[98] * 1000:6.2f} ms  "
        f"{throughput:7.0f} lookups/s  ({len(latencies)} lookups)"
    )


async def _run(entries: int, lookups: int, concurrency: int, threads: int) -> None:
    queries = _texts("test")[:lookups]
    with tempfile.TemporaryDirectory() as data_dir:
        process, address = await _start_cache(data_dir, entries, threads)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = cache_pb2_grpc.CacheServiceStub(channel)
                outcomes: list[int] = []

                async def lookup(text: str) -> object:
                    found = await stub.Lookup(
                        cache_pb2.LookupRequest(key=_key(text)), metadata=AUTH, timeout=10
                    )
                    outcomes.append(found.outcome)
                    return found

                await _timed(lookup, queries[:50], 1)  # warm up
                rss_before = _rss_bytes(process.pid)
                store_rate = await _fill(stub, entries)
                rss_after = _rss_bytes(process.pid)
                stats = await stub.GetStats(cache_pb2.GetStatsRequest(), metadata=AUTH)
                outcomes.clear()
                semantic, rate = await _timed(lookup, queries, 1)
                hits = sum(o == types_pb2.CACHE_OUTCOME_SEMANTIC for o in outcomes)
                exact, exact_rate = await _timed(lookup, _texts("train")[:lookups], 1)
                _, loaded_rate = await _timed(lookup, queries, concurrency)
        finally:
            process.terminate()
            await process.wait()
    print(f"cache service over gRPC, {stats.entries:,} entries in one partition")
    print(f"filled at {store_rate:,.0f} stores/s (vectors supplied)")
    _report("semantic Lookup, 1 caller", semantic, rate)
    _report("exact hit Lookup, 1 caller", exact, exact_rate)
    print(f"semantic Lookup, {concurrency} callers: {loaded_rate:,.0f} lookups/s")
    print(f"semantic hits among never-stored test questions: {hits / len(queries):.1%}")
    print(
        f"memory: resident set +{(rss_after - rss_before) / 2**20:,.0f} MiB for {entries:,} "
        f"entries; accounted {stats.memory_bytes / 2**20:,.0f} MiB "
        f"({stats.memory_bytes / max(stats.entries, 1):,.0f} B/entry)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="cache.embedding_threads")
    args = parser.parse_args()
    asyncio.run(_run(args.entries, args.lookups, args.concurrency, args.threads))


if __name__ == "__main__":
    main()
