"""Embedding runtimes for all-MiniLM-L6-v2: sentence-transformers on torch (the
reference) against the cache's ONNX Runtime path, on Banking77 test questions.

Prints, per runtime and thread count, the latency of one question at a time
(p50/p99) and the throughput in batches of 8 and 32, then how closely the ONNX
vectors agree with the reference (cosine, worst and mean).

    .venv/bin/python bench/embedding.py
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from costmesh_tools.cache.stock import minilm_dir, minilm_encoder
from services.common.embedding import shared_encoder

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "banking77"
Embed = Callable[[Sequence[str]], object]


def _questions(count: int) -> list[str]:
    with (DATA / "test.csv").open(newline="") as fh:
        return [row["text"] for row in csv.DictReader(fh)][:count]


def _latency(embed: Embed, texts: list[str]) -> tuple[float, float]:
    times = []
    for text in texts:
        started = time.perf_counter()
        embed([text])
        times.append(time.perf_counter() - started)
    cuts = statistics.quantiles(times, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


def _throughput(embed: Embed, texts: list[str], batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        embed(texts[start : start + batch])
    return len(texts) / (time.perf_counter() - started)


def _row(name: str, embed: Embed, texts: list[str]) -> None:
    embed(texts[:20])  # warm up
    p50, p99 = _latency(embed, texts)
    batched = [_throughput(embed, texts, batch) for batch in (8, 32)]
    print(
        f"{name:<34} p50 {p50:5.2f} ms  p99 {p99:5.2f} ms  "
        f"batch 8: {batched[0]:5.0f}/s  batch 32: {batched[1]:5.0f}/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=500)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    texts = _questions(args.questions)
    reference = SentenceTransformer(str(minilm_dir()), device="cpu")
    print(f"all-MiniLM-L6-v2, {len(texts)} Banking77 test questions, {os.cpu_count()} CPUs")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        _row(
            f"sentence-transformers, {threads} thread(s)",
            lambda batch: reference.encode(list(batch), normalize_embeddings=True),
            texts,
        )
        onnx = minilm_encoder(threads)
        _row(f"ONNX Runtime, {threads} thread(s)", onnx.embed_sync, texts)
        shipped = shared_encoder(None, threads)
        _row(f"shipped model (int8), {threads} thread(s)", shipped.embed_sync, texts)
    expected = reference.encode(texts, normalize_embeddings=True)
    agreement = (onnx.embed_sync(texts).vectors * expected).sum(axis=1)
    print(f"agreement with the reference: cosine min {agreement.min():.7f}, ", end="")
    print(f"mean {float(np.mean(agreement)):.7f}")


if __name__ == "__main__":
    main()
