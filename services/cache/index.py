"""Nearest-neighbour search over the vectors of one semantic partition.

Rows live in one contiguous float32 matrix; removal moves the last row into the
hole, so the matrix never holds dead rows and exact search is one matrix-vector
product. Above `ann_threshold` vectors an HNSW graph answers instead (the library
and the threshold were chosen by bench/vector_index.py, see bench/NOTES.md).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]


class VectorIndex:
    """Cosine top-k over unit vectors, with O(1) add and remove by entry id."""

    def __init__(self, dimensions: int, ann_threshold: int = 0) -> None:
        self.dimensions = dimensions
        self._ann_threshold = ann_threshold
        self._matrix = np.empty((16, dimensions), dtype=np.float32)
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._rows

    @property
    def nbytes(self) -> int:
        return int(self._matrix.nbytes)

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
        self._matrix[row] = vector

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
        if len(self._ids) < len(self._matrix) // 4 and len(self._matrix) > 16:
            self._matrix = self._matrix[: len(self._matrix) // 2].copy()
        return True

    def search(self, vector: Vector, k: int = 1) -> list[tuple[str, float]]:
        """The k nearest entries, most similar first, with their cosine similarity."""
        count = len(self._ids)
        if count == 0:
            return []
        scores = self._matrix[:count] @ vector
        k = min(k, count)
        top = np.argpartition(-scores, k - 1)[:k] if k < count else np.arange(count)
        top = top[np.argsort(-scores[top])]
        return [(self._ids[i], float(scores[i])) for i in top]
