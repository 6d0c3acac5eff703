"""Nearest-neighbour search over the vectors of one semantic partition.

Rows live in one contiguous float32 matrix; removal moves the last row into the
hole, so the matrix never holds dead rows and exact search is one matrix-vector
product. Past `ann_threshold` vectors a usearch HNSW graph (f16) proposes the
candidates instead and the matrix re-scores them, so every similarity the cache
compares with its threshold is exact. bench/vector_index.py chose the library and
the threshold (bench/NOTES.md): below ~3,000 vectors exact search is faster.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]
# Candidates the graph proposes per wanted result, before exact re-scoring.
_OVERSAMPLE = 4


class VectorIndex:
    """Cosine top-k over unit vectors, with O(1) add and remove by entry id."""

    def __init__(self, dimensions: int, ann_threshold: int = 0) -> None:
        self.dimensions = dimensions
        self._ann_threshold = ann_threshold
        # Grown by doubling from one row: most partitions (one per conversation
        # context and tenant) hold a handful of questions.
        self._matrix = np.empty((1, dimensions), dtype=np.float32)
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._graph: Any = None  # usearch.index.Index once the partition is large
        self._labels: dict[str, int] = {}  # entry id -> graph key (uint64)
        self._by_label: dict[int, str] = {}
        self._next_label = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._rows

    @property
    def nbytes(self) -> int:
        graph = 0 if self._graph is None else int(self._graph.memory_usage)
        return int(self._matrix.nbytes) + graph

    @property
    def approximate(self) -> bool:
        """True while searches go through the HNSW graph."""
        return self._graph is not None

    def add(self, entry_id: str, vector: Vector) -> None:
        """Insert or replace the vector of an entry."""
        row = self._rows.get(entry_id)
        if row is None:
            row = len(self._ids)
            if row == len(self._matrix):
                grown = np.empty((2 * len(self._matrix), self.dimensions), dtype=np.float32)
                grown[:row] = self._matrix
                self._matrix = grown
            self._ids.append(entry_id)
            self._rows[entry_id] = row
        elif self._graph is not None:  # a replaced vector: the graph forgets the old one
            label = self._labels.pop(entry_id)
            del self._by_label[label]
            self._graph.remove(label)
        self._matrix[row] = vector
        if self._graph is not None:
            self._graph_add([entry_id], self._matrix[row : row + 1])
        elif self._ann_threshold and len(self._ids) > self._ann_threshold:
            self._build_graph()

    def remove(self, entry_id: str) -> bool:
        row = self._rows.pop(entry_id, None)
        if row is None:
            return False
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._matrix[row] = self._matrix[last]
            self._ids[row] = moved
            self._rows[moved] = row
        self._ids.pop()
        if self._graph is not None:
            label = self._labels.pop(entry_id)
            del self._by_label[label]
            self._graph.remove(label)
            if len(self._ids) < self._ann_threshold // 2:  # hysteresis: no flapping
                self._graph = None
                self._labels.clear()
                self._by_label.clear()
        if len(self._ids) < len(self._matrix) // 4:
            self._matrix = self._matrix[: len(self._matrix) // 2].copy()
        return True

    def search(self, vector: Vector, k: int = 1) -> list[tuple[str, float]]:
        """The k nearest entries, most similar first, with their cosine similarity."""
        count = len(self._ids)
        if count == 0:
            return []
        if self._graph is not None:
            return self._search_graph(vector, k)
        # Not `matrix @ vector`: past about 1,300 rows OpenBLAS hands that to its thread
        # pool, whose threads then spin between look-ups: that doubled the CPU of a
        # cache miss (bench/NOTES.md). einsum stays on this thread (0.2 ms at 3,000).
        scores = np.einsum("ij,j->i", self._matrix[:count], vector)
        k = min(k, count)
        top = np.argpartition(-scores, k - 1)[:k] if k < count else np.arange(count)
        top = top[np.argsort(-scores[top])]
        return [(self._ids[i], float(scores[i])) for i in top]

    def _search_graph(self, vector: Vector, k: int) -> list[tuple[str, float]]:
        found = self._graph.search(vector, k * _OVERSAMPLE, threads=1)
        rows = [self._rows[self._by_label[int(label)]] for label in found.keys]
        scores = self._matrix[rows] @ vector
        order = np.argsort(-scores)[:k]
        return [(self._ids[rows[i]], float(scores[i])) for i in order]

    def _build_graph(self) -> None:
        """Index every row at once (about 0.5 s for 3,000 rows), then add as they come."""
        from usearch.index import Index  # noqa: PLC0415 - small partitions never need it

        self._graph = Index(
            ndim=self.dimensions,
            metric="ip",
            dtype="f16",
            connectivity=16,
            expansion_add=200,
            expansion_search=64,
        )
        self._graph_add(list(self._ids), self._matrix[: len(self._ids)])

    def _graph_add(self, entry_ids: list[str], vectors: Vector) -> None:
        labels = np.arange(self._next_label, self._next_label + len(entry_ids), dtype=np.uint64)
        self._next_label += len(entry_ids)
        for entry_id, label in zip(entry_ids, labels.tolist(), strict=True):
            self._labels[entry_id] = label
            self._by_label[label] = entry_id
        self._graph.add(labels, vectors, threads=1)


class PartitionedIndex:
    """One VectorIndex per semantic partition: made by its first vector, dropped
    with its last, so a search never looks outside its partition."""

    def __init__(self, dimensions: int, ann_threshold: int) -> None:
        self._dimensions = dimensions
        self._ann_threshold = ann_threshold
        self._indexes: dict[str, VectorIndex] = {}

    def add(self, partition: str, entry_id: str, vector: Vector) -> None:
        index = self._indexes.get(partition)
        if index is None:
            index = self._indexes[partition] = VectorIndex(self._dimensions, self._ann_threshold)
        index.add(entry_id, vector)

    def remove(self, partition: str, entry_id: str) -> None:
        index = self._indexes.get(partition)
        if index is not None:
            index.remove(entry_id)
            if not len(index):
                del self._indexes[partition]

    def search(self, partition: str, vector: Vector, k: int) -> list[tuple[str, float]]:
        index = self._indexes.get(partition)
        return [] if index is None else index.search(vector, k)

    def clear(self) -> None:
        self._indexes.clear()


class ExpiryQueue:
    """Entry ids by expiry time. Entries removed or re-stored meanwhile leave stale
    items behind; the owner skips those by comparing the expiry it holds, and
    `compact` drops them when they outnumber the live ones."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, expires_at: float, entry_id: str) -> None:
        heapq.heappush(self._heap, (expires_at, entry_id))

    def compact(self, live: Callable[[float, str], bool]) -> None:
        self._heap = [item for item in self._heap if live(*item)]
        heapq.heapify(self._heap)

    def due(self, now: float) -> Iterator[tuple[float, str]]:
        while self._heap and self._heap[0][0] <= now:
            yield heapq.heappop(self._heap)

    def clear(self) -> None:
        self._heap.clear()
