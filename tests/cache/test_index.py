"""The vector index: exact below its threshold, HNSW above, same answers either way."""

from __future__ import annotations

import numpy as np

from services.cache.index import VectorIndex
from services.common.embedding import normalise

DIMENSIONS = 32


def vectors(count: int, seed: int = 1) -> np.ndarray:
    return normalise(np.random.default_rng(seed).normal(size=(count, DIMENSIONS)))


def exact_best(rows: dict[str, np.ndarray], query: np.ndarray) -> tuple[str, float]:
    best = max(rows, key=lambda entry_id: float(rows[entry_id] @ query))
    return best, float(rows[best] @ query)


def test_the_graph_takes_over_past_the_threshold_and_agrees_with_exact_search() -> None:
    index = VectorIndex(DIMENSIONS, ann_threshold=100)
    rows = {f"e{i}": v for i, v in enumerate(vectors(400))}
    for entry_id, vector in rows.items():
        index.add(entry_id, vector)
    queries = normalise(vectors(50, seed=2) * 0.3 + np.stack(list(rows.values())[:50]))

    assert index.approximate
    for query in queries:
        (found, similarity), *_ = index.search(query, k=3)
        expected, expected_similarity = exact_best(rows, query)
        assert found == expected
        assert abs(similarity - expected_similarity) < 1e-5  # re-scored exactly


def test_removed_and_replaced_entries_are_never_returned() -> None:
    index = VectorIndex(DIMENSIONS, ann_threshold=100)
    rows = {f"e{i}": v for i, v in enumerate(vectors(300))}
    for entry_id, vector in rows.items():
        index.add(entry_id, vector)
    for i in range(0, 300, 3):
        index.remove(f"e{i}")
        del rows[f"e{i}"]
    moved = vectors(1, seed=9)[0]
    index.add("e1", moved)  # replaced: only the new vector may match
    rows["e1"] = moved

    assert len(index) == 200
    assert index.search(moved, k=1)[0][0] == "e1"
    for entry_id, vector in rows.items():
        (found, _), *_ = index.search(vector, k=1)
        assert found == entry_id


def test_shrinking_well_below_the_threshold_goes_back_to_exact_search() -> None:
    index = VectorIndex(DIMENSIONS, ann_threshold=100)
    rows = vectors(150)
    for i, vector in enumerate(rows):
        index.add(f"e{i}", vector)
    for i in range(110):
        index.remove(f"e{i}")

    assert not index.approximate
    assert index.search(rows[120], k=1)[0][0] == "e120"
    assert [entry_id for entry_id, _ in index.search(rows[120], k=40)].count("e5") == 0
