"""Hit rate of the semantic cache under a capacity bound: LRU (the cache's policy)
against FIFO, on a stream of real support questions.

Replays Banking77 (train then test, in a seeded random order, so popular intents
come back again and again) through SemanticCache on the in-process store: each
question is looked up, and stored on a miss. With the capacity far below the
number of distinct questions, the eviction policy decides what is still there when
a question returns. FIFO is the same store with hits no longer refreshing recency.

    .venv/bin/python bench/eviction.py --capacities 250,1000,4000
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
from collections.abc import Sequence
from pathlib import Path

from services.cache.keys import RequestKey
from services.cache.semantic import FeaturePolicy, SemanticCache
from services.cache.store import Answer, Capacity, Entry, MemoryStore
from services.common.embedding import MINILM_DIMENSIONS, Embeddings, shared_encoder

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "banking77"
ANSWER = Answer("answer", "gpt-4o-mini", 10, 0, 5, "stop")


class FifoStore(MemoryStore):
    """The in-process store with recency frozen at insertion: first in, first out."""

    async def touch(self, entry: Entry) -> None:
        """A hit changes nothing."""


class _Precomputed:
    """The stream's embeddings, computed once and shared by every run."""

    model = shared_encoder(None, 2).model
    dimensions = MINILM_DIMENSIONS
    thresholds = shared_encoder(None, 2).thresholds
    billed = False

    def __init__(self, texts: list[str]) -> None:
        embedded = shared_encoder(None, 2).embed_sync(texts)
        self._rows = {t: embedded.vectors[i : i + 1] for i, t in enumerate(texts)}

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        return Embeddings(self._rows[texts[0]], 0)

    async def close(self) -> None:
        """Nothing to release."""


def _stream(seed: int) -> list[str]:
    texts: list[str] = []
    for split in ("train", "test"):
        with (DATA / f"{split}.csv").open(newline="") as fh:
            texts.extend(row["text"] for row in csv.DictReader(fh))
    random.Random(seed).shuffle(texts)
    return texts


async def _hit_rate(
    store: MemoryStore, embedder: _Precomputed, texts: list[str], capacity: int
) -> float:
    policy = FeaturePolicy(capacity=Capacity(capacity))
    cache = SemanticCache(store, embedder, {"default": policy})
    hits = 0
    for text in texts:
        key = RequestKey("bench", "support", "", "", "", ((2, text),), b"")
        found = await cache.lookup(key)
        if found.entry is not None:
            hits += 1
        else:
            await cache.put(key, ANSWER, 3600, (), vector=found.vector)
    return hits / len(texts)


async def _run(capacities: list[int], seed: int) -> None:
    texts = _stream(seed)
    embedder = _Precomputed(sorted(set(texts)))
    print(
        f"Banking77 stream: {len(texts):,} questions, {len(set(texts)):,} distinct, threshold 0.94"
    )
    print(f"{'capacity':>9}  {'LRU hit rate':>12}  {'FIFO hit rate':>13}")
    for capacity in capacities:
        lru = await _hit_rate(MemoryStore(MINILM_DIMENSIONS, 3000), embedder, texts, capacity)
        fifo = await _hit_rate(FifoStore(MINILM_DIMENSIONS, 3000), embedder, texts, capacity)
        print(f"{capacity:>9,}  {lru:>12.2%}  {fifo:>13.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacities", default="250,1000,4000")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(_run([int(c) for c in args.capacities.split(",")], args.seed))


if __name__ == "__main__":
    main()
