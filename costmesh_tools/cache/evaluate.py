"""`costmesh cache eval`: how often a real cache answers with another intent's answer.

Intent labels give a semantic cache a ground truth: two queries with the same intent
ask the same thing, so a hit whose stored question carries another label is a false
hit, an answer to a question nobody asked. Everything goes through CacheService over
gRPC, so what is measured is what callers get: embedding, search and guard included.

`fill` stores one part of a labelled set and looks the other part up once with the
threshold at 0, so every lookup reports its best candidate and the guard's verdict on
it. The guard does not depend on the threshold, so replaying those answers against a
sweep of thresholds gives, row by row, what the cache would serve at each one.
`stream` replays the queries in order at one threshold and stores each miss, the way
live traffic fills a cache.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from opentelemetry.sdk.trace import TracerProvider

from costmesh.cache.v1 import cache_pb2, cache_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_tools.cache import comparison
from costmesh_tools.cache.intents import (
    DATA_SETS,
    OOS,
    Example,
    IntentDataError,
    default_data_dir,
    load_intents,
    parse_data_sets,
    read_labelled,
    unique,
)
from costmesh_tools.cli_support import count, positive, unit, unit_list, write_grid
from services.common.auth import new_key
from services.common.config import load_config
from services.common.embedding import ModelError

DEFAULT_THRESHOLDS = tuple(round(0.80 + 0.02 * i, 2) for i in range(10))
FORMATS = ("table", "csv", "markdown")
FEATURE = "eval"
TTL_SECONDS = 30 * 24 * 3600  # the longest the cache accepts: nothing expires mid-run
TRAIN_SHARE = 0.7
UNKNOWN = "?"  # the label of a candidate the evaluation cannot name
_HITS = (types_pb2.CACHE_OUTCOME_EXACT, types_pb2.CACHE_OUTCOME_SEMANTIC)
_CALL_TIMEOUT = 60.0
Vector = npt.NDArray[np.float32]
T = TypeVar("T")


class EvalError(ValueError):
    """Something the user can fix (a missing file, a bad option): one line, exit 2."""


# --- labelled data ------------------------------------------------------------


@dataclass(frozen=True)
class LabelledSet:
    """The part stored in the cache and the part looked up against it."""

    name: str
    stored: tuple[Example, ...]
    queries: tuple[Example, ...]


def load_set(data: str, data_dir: Path, seed: int = 0) -> LabelledSet:
    """banking77, clinc150 or bitext (train stored, test looked up: services/cache/
    intents.py), or a .jsonl/.csv file of `text` and `label`, split 70/30 by a seeded
    shuffle."""
    if data in DATA_SETS:
        try:
            intents = load_intents(data, data_dir, seed)
        except IntentDataError as exc:
            raise EvalError(str(exc)) from None
        return LabelledSet(data, unique(intents.train), intents.test)
    return _split_file(Path(data), seed)


def _split_file(path: Path, seed: int) -> LabelledSet:
    try:
        rows = list(read_labelled(path))
    except IntentDataError as exc:
        raise EvalError(str(exc)) from None
    if len(rows) < 2:
        raise EvalError(f"{path}: needs at least two labelled rows")
    random.Random(seed).shuffle(rows)
    cut = min(max(round(len(rows) * TRAIN_SHARE), 1), len(rows) - 1)
    return LabelledSet(path.name, unique(rows[:cut]), tuple(rows[cut:]))


# --- the cache, over gRPC -----------------------------------------------------


@dataclass
class CacheClient:
    """Calls to one cache service, at most `concurrency` in flight."""

    stub: cache_pb2_grpc.CacheServiceAsyncStub
    metadata: tuple[tuple[str, str], ...]
    concurrency: int = 32
    _limit: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._limit = asyncio.Semaphore(self.concurrency)

    async def lookup(self, namespace: str, text: str, threshold: float) -> cache_pb2.LookupResponse:
        request = cache_pb2.LookupRequest(key=_key(namespace, text), similarity_threshold=threshold)
        async with self._limit:
            return await self.stub.Lookup(request, metadata=self.metadata, timeout=_CALL_TIMEOUT)

    async def store(
        self, namespace: str, example: Example, looked_up: cache_pb2.LookupResponse
    ) -> str:
        """Store the example's answer, reusing the lookup's embedding; the entry id."""
        request = cache_pb2.StoreRequest(
            key=_key(namespace, example.text),
            content=f"The answer for intent {example.label}.",
            model="eval",
            ttl_seconds=TTL_SECONDS,
            finish_reason="stop",
            query_embedding=looked_up.query_embedding,
            embedding_model=looked_up.embedding_model,
        )
        async with self._limit:
            response = await self.stub.Store(request, metadata=self.metadata, timeout=_CALL_TIMEOUT)
        if not response.entry_id:
            raise EvalError("the cache dropped a store: is its backend down?")
        return response.entry_id

    async def report(self, namespace: str, text: str, entry_id: str) -> None:
        request = cache_pb2.ReportWrongHitRequest(key=_key(namespace, text), entry_id=entry_id)
        async with self._limit:
            await self.stub.ReportWrongHit(request, metadata=self.metadata, timeout=_CALL_TIMEOUT)

    async def drop(self, namespace: str) -> None:
        request = cache_pb2.InvalidateRequest(feature=FEATURE, namespace=namespace)
        await self.stub.Invalidate(request, metadata=self.metadata, timeout=_CALL_TIMEOUT)


def _key(namespace: str, text: str) -> cache_pb2.CacheKey:
    return cache_pb2.CacheKey(
        team=FEATURE,
        feature=FEATURE,
        namespace=namespace,
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
    )


@asynccontextmanager
async def open_cache(target: str, api_key: str, concurrency: int) -> AsyncIterator[CacheClient]:
    """A running cache at `target`, or one started here on the embedded defaults."""
    if target and not api_key:
        raise EvalError("--target needs --api-key (or COSTMESH_API_KEY)")
    async with (
        _address(target, api_key) as (address, key),
        grpc.aio.insecure_channel(address) as channel,
    ):
        yield CacheClient(
            cache_pb2_grpc.CacheServiceStub(channel),
            (("authorization", f"Bearer {key}"),),
            concurrency,
        )


@asynccontextmanager
async def _address(target: str, api_key: str) -> AsyncIterator[tuple[str, str]]:
    if target:
        yield target, api_key
        return
    config = load_config(env={})  # the embedded defaults, whatever this shell sets
    service_key = new_key()  # only this process knows it: nobody else can call in
    env = {config.section("auth").get_str("service_key_env"): service_key}
    provider = TracerProvider()  # no exporter: an evaluation's spans go nowhere
    from services.mesh import start_mesh  # noqa: PLC0415 - `cache eval --help` stays light

    running = await start_mesh(config, env, ["cache"], provider, port=0)
    try:
        yield f"{config.section('server').get_str('host')}:{running.port}", service_key
    finally:
        await running.stop(grace=1)
        provider.shutdown()


# --- what the cache did -------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """A stored question a lookup matched (served, or refused by the guard)."""

    question: str
    label: str
    similarity: float


@dataclass(frozen=True)
class Observation:
    """One lookup: what was served, or what the guard refused to serve and why."""

    query: Example
    served: Match | None = None
    refused: Match | None = None
    rejection: str = ""


def is_false(query: Example, match: Match) -> bool:
    """A match answers another intent; an out-of-scope query has no right answer."""
    return query.label == OOS or match.label != query.label


class Memory:
    """What the evaluation stored: each entry's label, and the vectors that name the
    candidate a guard refusal leaves out of the response."""

    def __init__(self) -> None:
        self.labels: dict[str, str] = {}
        self._examples: list[Example] = []
        self._vectors: list[Vector] = []
        self._matrix: Vector | None = None

    def add(self, entry_id: str, example: Example, looked_up: cache_pb2.LookupResponse) -> None:
        self.labels[entry_id] = example.label
        if looked_up.query_embedding:
            self._examples.append(example)
            self._vectors.append(np.asarray(looked_up.query_embedding, dtype=np.float32))
            self._matrix = None

    def observe(self, query: Example, response: cache_pb2.LookupResponse) -> Observation:
        if response.outcome in _HITS:
            entry = response.entry
            label = self.labels.get(entry.entry_id, UNKNOWN)
            served = Match(entry.question, label, response.similarity)
            if not response.guard_rejection:
                return Observation(query, served=served)
            # A nearer candidate was refused before this one was served.
            refused = self._nearest(response)
            return Observation(query, served, refused, response.guard_rejection)
        if response.guard_rejection:
            refused = self._nearest(response)
            return Observation(query, refused=refused, rejection=response.guard_rejection)
        return Observation(query)

    def _nearest(self, response: cache_pb2.LookupResponse) -> Match:
        """The stored question the cache judged: the one at its reported similarity."""
        unknown = Match("", UNKNOWN, response.best_similarity)
        if not response.query_embedding or not self._vectors:
            return unknown
        if self._matrix is None:
            self._matrix = np.stack(self._vectors)
        scores = self._matrix @ np.asarray(response.query_embedding, dtype=np.float32)
        best = int(np.argmax(scores))
        if abs(float(scores[best]) - response.best_similarity) > 1e-3:
            return unknown  # an approximate index judged another neighbour
        example = self._examples[best]
        return Match(example.text, example.label, response.best_similarity)


# --- running an evaluation ----------------------------------------------------


@dataclass(frozen=True)
class FillRun:
    observations: list[Observation]
    stored: int
    store_seconds: float
    lookup_seconds: float


@dataclass(frozen=True)
class StreamRun:
    observations: list[Observation]
    threshold: float
    stored: int
    seconds: float
    reports: int = -1  # wrong hits reported; -1: none were


def new_namespace() -> str:
    """A namespace of its own per run, so repeated runs never see each other's entries."""
    return f"eval-{uuid.uuid4().hex}"


@asynccontextmanager
async def scratch_namespace(client: CacheClient) -> AsyncIterator[str]:
    """A new namespace, emptied afterwards: a shared cache keeps no evaluation entries."""
    namespace = new_namespace()
    try:
        yield namespace
    finally:
        with contextlib.suppress(grpc.RpcError):  # a dead cache holds nothing to clean
            await client.drop(namespace)


async def run_fill(client: CacheClient, labelled: LabelledSet, namespace: str) -> FillRun:
    """Store the stored part, then look every query up with the threshold at 0."""
    memory = Memory()
    started = time.perf_counter()
    stored = _by_length(labelled.stored)
    await _all(_store_one(client, memory, namespace, e) for e in stored)
    filled = time.perf_counter()
    queries = labelled.queries
    order = sorted(range(len(queries)), key=lambda i: len(queries[i].text))
    responses = await _all(client.lookup(namespace, queries[i].text, 0.0) for i in order)
    done = time.perf_counter()
    by_index = dict(zip(order, responses, strict=True))
    observations = [memory.observe(q, by_index[i]) for i, q in enumerate(queries)]
    return FillRun(observations, len(memory.labels), filled - started, done - filled)


async def _all(calls: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Every result in order; the first failure cancels the rest and is raised as is,
    so a dead cache is one error line, not thousands."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def _by_length(examples: Sequence[Example]) -> list[Example]:
    """Shortest first: texts sent together are embedded together, and a batch of
    similar lengths wastes little on padding (about twice the throughput)."""
    return sorted(examples, key=lambda e: len(e.text))


async def _store_one(client: CacheClient, memory: Memory, namespace: str, example: Example) -> None:
    # A lookup in an empty namespace embeds the question and returns the vector: the
    # store reuses it, and the evaluation keeps it to name refused candidates.
    probe = await client.lookup(f"{namespace}-probe", example.text, 1.0)
    entry_id = await client.store(namespace, example, probe)
    memory.add(entry_id, example, probe)


async def run_stream(
    client: CacheClient,
    queries: Sequence[Example],
    threshold: float,
    namespace: str,
    *,
    report: bool = False,
) -> StreamRun:
    """Each query in order: a hit is served, a miss is stored for the ones after it.
    With `report`, the user of every false hit reports it (ReportWrongHit), as a
    caller that checks its answers would: the entry goes, its partition's bar rises."""
    memory = Memory()
    observations = []
    reports = 0
    started = time.perf_counter()
    for query in queries:
        response = await client.lookup(namespace, query.text, threshold)
        observation = memory.observe(query, response)
        if observation.served is None:
            memory.add(await client.store(namespace, query, response), query, response)
        elif report and is_false(query, observation.served):
            await client.report(namespace, query.text, response.entry.entry_id)
            reports += 1
        observations.append(observation)
    seconds = time.perf_counter() - started
    return StreamRun(
        observations, threshold, len(memory.labels), seconds, reports if report else -1
    )


def stream_order(queries: Sequence[Example], seed: int) -> list[Example]:
    """The queries in a seeded random order: one reproducible day of traffic."""
    shuffled = list(queries)
    random.Random(seed).shuffle(shuffled)
    return shuffled


# --- scoring ------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """What the cache serves at one threshold, and what its guard held back."""

    threshold: float
    queries: int
    hits: int
    false_hits: int
    oos_queries: int
    oos_hits: int
    refused: int
    prevented: int  # refused candidates of another intent: false hits the guard stopped
    lost: int  # refused candidates of the same intent: right answers not served

    @property
    def hit_rate(self) -> float:
        return _share(self.hits, self.queries)

    @property
    def false_hit_rate(self) -> float:
        """False hits as a share of all queries: how often a caller gets a wrong answer."""
        return _share(self.false_hits, self.queries)

    @property
    def precision_loss(self) -> float:
        """False hits as a share of hits: how far a served answer can be trusted."""
        return _share(self.false_hits, self.hits)

    @property
    def oos_hit_rate(self) -> float:
        return _share(self.oos_hits, self.oos_queries)


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def score(observations: Sequence[Observation], threshold: float) -> Row:
    """The row of one threshold; served similarities below it would have been misses."""
    hits = [
        (o.query, o.served)
        for o in observations
        if o.served is not None and o.served.similarity >= threshold
    ]
    refused = [
        (o.query, o.refused)
        for o in observations
        if o.refused is not None and o.refused.similarity >= threshold
    ]
    known = [(q, m) for q, m in refused if m.label != UNKNOWN]
    return Row(
        threshold=threshold,
        queries=len(observations),
        hits=len(hits),
        false_hits=sum(is_false(q, m) for q, m in hits),
        oos_queries=sum(o.query.label == OOS for o in observations),
        oos_hits=sum(q.label == OOS for q, _ in hits),
        refused=len(refused),
        prevented=sum(is_false(q, m) for q, m in known),
        lost=sum(not is_false(q, m) for q, m in known),
    )


def sweep(observations: Sequence[Observation], thresholds: Iterable[float]) -> list[Row]:
    return [score(observations, t) for t in sorted(thresholds)]


def recommend(rows: Sequence[Row], max_false_hit_rate: float) -> Row | None:
    """The lowest threshold (the most hits) whose false hits per served hit, and
    out-of-scope hits when the set has out-of-scope queries, stay within the limit."""
    for row in sorted(rows, key=lambda r: r.threshold):
        in_scope = row.precision_loss <= max_false_hit_rate
        if in_scope and (not row.oos_queries or row.oos_hit_rate <= max_false_hit_rate):
            return row
    return None


def false_hits(observations: Sequence[Observation], threshold: float) -> list[Observation]:
    """The false hits served at a threshold, most similar first."""
    found = [
        o
        for o in observations
        if o.served is not None and o.served.similarity >= threshold and is_false(o.query, o.served)
    ]
    return sorted(found, key=lambda o: (-(o.served.similarity if o.served else 0), o.query.text))


# --- output -------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    title: str
    csv_name: str
    cell: Callable[[Row], str]
    csv_cell: Callable[[Row], str]
    oos_only: bool = False


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _threshold(value: float) -> str:
    return f"{value:.2f}" if round(value, 2) == value else f"{value:g}"


def _int(getter: Callable[[Row], int]) -> tuple[Callable[[Row], str], Callable[[Row], str]]:
    return (lambda r: str(getter(r))), (lambda r: str(getter(r)))


def _rate(getter: Callable[[Row], float]) -> tuple[Callable[[Row], str], Callable[[Row], str]]:
    return (lambda r: _pct(getter(r))), (lambda r: f"{getter(r):.6f}")


COLUMNS = (
    Column("threshold", "threshold", lambda r: _threshold(r.threshold), lambda r: f"{r.threshold}"),
    Column("hits", "hits", *_int(lambda r: r.hits)),
    Column("hit %", "hit_rate", *_rate(lambda r: r.hit_rate)),
    Column("false hits", "false_hits", *_int(lambda r: r.false_hits)),
    Column("false-hit %", "false_hit_rate", *_rate(lambda r: r.false_hit_rate)),
    Column("false/hits %", "false_share_of_hits", *_rate(lambda r: r.precision_loss)),
    Column("oos hits", "oos_hits", *_int(lambda r: r.oos_hits), oos_only=True),
    Column("oos-hit %", "oos_hit_rate", *_rate(lambda r: r.oos_hit_rate), oos_only=True),
    Column("guard refused", "guard_refused", *_int(lambda r: r.refused)),
    Column("false hits prevented", "guard_prevented", *_int(lambda r: r.prevented)),
    Column("hits lost", "guard_lost", *_int(lambda r: r.lost)),
)


@dataclass(frozen=True)
class Report:
    """One table and the lines around it."""

    title: str
    rows: list[Row]
    notes: list[str]
    examples: list[Observation]
    examples_title: str = ""


def render(report: Report, fmt: str, out: TextIO, err: TextIO) -> None:
    """Table or markdown on `out`; CSV keeps `out` machine-readable and notes go to `err`."""
    oos = any(r.oos_queries for r in report.rows)
    columns = [c for c in COLUMNS if oos or not c.oos_only]
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([c.csv_name for c in columns])
        writer.writerows([c.csv_cell(r) for c in columns] for r in report.rows)
        for line in [report.title, *report.notes]:
            err.write(f"{line}\n")
        return
    out.write(f"{report.title}\n\n")
    lines = [[c.cell(r) for c in columns] for r in report.rows]
    write_grid(out, [c.title for c in columns], lines, fmt)
    out.write("\n")
    for line in report.notes:
        out.write(f"{line}\n")
    if report.examples:
        out.write(f"\n{report.examples_title}\n\n")
        _write_examples(out, report.examples, fmt)
    out.write("\n")


def _write_examples(out: TextIO, examples: Sequence[Observation], fmt: str) -> None:
    header = ["similarity", "query", "label", "matched question", "matched label"]
    lines = [
        [
            f"{o.served.similarity:.3f}",
            o.query.text,
            o.query.label,
            o.served.question,
            o.served.label,
        ]
        for o in examples
        if o.served is not None
    ]
    if fmt == "markdown":
        write_grid(out, header, lines, fmt, numeric=1)
        return
    for sim, query, label, question, matched in lines:
        out.write(f"  {sim}  [{label}] {query!r}\n         -> [{matched}] {question!r}\n")


# --- the command --------------------------------------------------------------


@dataclass(frozen=True)
class EvalOptions:
    data: str = "banking77"
    data_dir: Path = field(default_factory=default_data_dir)
    mode: str = "fill"
    report_wrong_hits: bool = False
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    threshold: float | None = None
    max_false_hit_rate: float = 0.01
    fmt: str = "table"
    target: str = ""
    api_key: str = ""
    concurrency: int = 32
    seed: int = 0
    examples: int = 10


async def evaluate(options: EvalOptions, out: TextIO, err: TextIO) -> int:
    """Run the chosen mode against the cache and print its reports."""
    if options.mode == "fill" and options.threshold is not None:
        raise EvalError("--threshold is for --mode stream; sweep with --thresholds")
    labelled = load_set(options.data, options.data_dir, options.seed)
    async with open_cache(options.target, options.api_key, options.concurrency) as client:
        threshold = options.threshold
        if options.mode == "fill" or threshold is None:
            async with scratch_namespace(client) as namespace:
                fill = await run_fill(client, labelled, namespace)
            rows = sweep(fill.observations, options.thresholds)
            best = recommend(rows, options.max_false_hit_rate)
            render(fill_report(labelled, fill, rows, best, options), options.fmt, out, err)
            threshold = _stream_threshold(best, rows)
        if options.mode == "stream":
            order = stream_order(labelled.queries, options.seed)
            async with scratch_namespace(client) as namespace:
                run = await run_stream(client, order, threshold, namespace)
            render(stream_report(labelled, run, options), options.fmt, out, err)
            if options.report_wrong_hits:
                async with scratch_namespace(client) as namespace:
                    run = await run_stream(client, order, threshold, namespace, report=True)
                render(stream_report(labelled, run, options), options.fmt, out, err)
    return 0


def _stream_threshold(best: Row | None, rows: Sequence[Row]) -> float:
    """The recommended threshold, or the strictest one tried when none qualifies."""
    return best.threshold if best is not None else max(r.threshold for r in rows)


def fill_report(
    labelled: LabelledSet, fill: FillRun, rows: list[Row], best: Row | None, options: EvalOptions
) -> Report:
    limit = _pct(options.max_false_hit_rate)
    if best is not None:
        verdict = (
            f"lowest threshold within budget ON THIS SET (a diagnostic: operating points "
            f"come from validation splits, --mode compare): {_threshold(best.threshold)} "
            f"(false hits at most {limit}% of served hits"
            + (", out-of-scope queries included)" if best.oos_queries else ")")
        )
        at = best.threshold
    else:
        verdict = (
            f"lowest threshold within budget: none: every threshold swept serves false hits "
            f"above {limit}% of served hits (strictest, {_threshold(rows[-1].threshold)}: "
            f"{_pct(rows[-1].precision_loss)}%, out-of-scope {_pct(rows[-1].oos_hit_rate)}%)"
        )
        at = rows[-1].threshold
    shown = false_hits(fill.observations, at)
    return Report(
        title=(
            f"{labelled.name}, fill: {fill.stored} questions stored, "
            f"{len(fill.observations)} looked up"
        ),
        rows=rows,
        notes=[
            verdict,
            f"time: stored {fill.stored} in {fill.store_seconds:.1f} s, "
            f"looked up {len(fill.observations)} in {fill.lookup_seconds:.1f} s",
        ],
        examples=shown[: options.examples],
        examples_title=_examples_title(shown, options.examples, at),
    )


def stream_report(labelled: LabelledSet, run: StreamRun, options: EvalOptions) -> Report:
    row = score(run.observations, run.threshold)
    shown = false_hits(run.observations, run.threshold)
    return Report(
        title=(
            f"{labelled.name}, stream at {_threshold(run.threshold)}: "
            f"{len(run.observations)} queries in a seeded order, each miss stored "
            f"({run.stored} entries)"
            + (f", each false hit reported ({run.reports} reports)" if run.reports >= 0 else "")
        ),
        rows=[row],
        notes=[
            f"time: streamed {len(run.observations)} queries in {run.seconds:.1f} s",
        ],
        examples=shown[: options.examples],
        examples_title=_examples_title(shown, options.examples, run.threshold),
    )


def _examples_title(shown: Sequence[Observation], limit: int, threshold: float) -> str:
    listed = min(len(shown), limit)
    return f"false hits at {_threshold(threshold)} ({listed} of {len(shown)}, most similar first):"


# --- argparse -----------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `eval` to the `costmesh cache` commands."""
    ev = sub.add_parser("eval", help="hits, false hits and recall of equivalence models and "
                        "of a real cache on labelled query sets")  # fmt: skip
    ev.add_argument("--data", default=None,
                    help=f"compare: comma-separated, of {', '.join(DATA_SETS)} (default: all); "
                    "fill and stream: one of them, or a .jsonl/.csv of text and label "
                    "(default banking77)")  # fmt: skip
    ev.add_argument("--data-dir", type=Path, default=default_data_dir(),
                    help="holds banking77/, clinc150/ and bitext_customer_support/ "
                    "(default: %(default)s)")  # fmt: skip
    ev.add_argument("--mode", choices=("compare", "fill", "stream"), default="compare",
                    help="compare: models side by side at their calibrated operating point "
                    "(default); fill: store train in a real cache, sweep thresholds over "
                    "test; stream: replay test in a seeded order, storing each miss")  # fmt: skip
    ev.add_argument("--models", default=f"{comparison.SHIPPED},{comparison.STOCK}",
                    help="compare: shipped, minilm (stock; the train extra) or model "
                    "folders (default: %(default)s)")  # fmt: skip
    ev.add_argument("--setting", choices=("in-domain", "lodo", "both"), default="in-domain",
                    help="compare: in-domain, leave-one-dataset-out, or both")  # fmt: skip
    ev.add_argument("--lodo-dir", type=Path, default=None,
                    help="compare: holds without-banking77/, without-clinc150/ and "
                    "without-bitext/ (costmesh cache train --data A,B --out ...)")  # fmt: skip
    ev.add_argument("--calibrate-on-data", action="store_true",
                    help="compare: thresholds from the --data sets' own validation splits "
                    "for every model (the card's ignored): the threshold for your own "
                    "labelled questions, e.g. --data own.jsonl")  # fmt: skip
    ev.add_argument("--target-false-hit-rate", type=unit, default=0.01,
                    help="compare: false hits per served hit allowed (default 0.01)")  # fmt: skip
    ev.add_argument("--report-wrong-hits", action="store_true",
                    help="stream: replay again, every false hit reported")  # fmt: skip
    ev.add_argument("--thresholds", type=unit_list, default=DEFAULT_THRESHOLDS,
                    help="comma-separated sweep (default 0.80,0.82,...,0.98)")  # fmt: skip
    ev.add_argument("--threshold", type=unit,
                    help="stream mode's threshold (default: the recommended one)")  # fmt: skip
    ev.add_argument("--max-false-hit-rate", type=unit, default=0.01)
    ev.add_argument("--format", choices=FORMATS, default="table")
    ev.add_argument("--target", default="", help="HOST:PORT of a running cache "
                    "(default: start one in this process on the embedded defaults)")  # fmt: skip
    ev.add_argument("--api-key", default=os.environ.get("COSTMESH_API_KEY", ""),
                    help="key for --target (default: $COSTMESH_API_KEY)")  # fmt: skip
    ev.add_argument("--concurrency", type=positive, default=32)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--examples", type=count, default=10, help="false hits to list")
    ev.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace, out: TextIO) -> int:
    if args.mode == "compare":
        return _compare(args, out)
    options = EvalOptions(
        data=args.data or "banking77",
        report_wrong_hits=args.report_wrong_hits,
        data_dir=args.data_dir,
        mode=args.mode,
        thresholds=args.thresholds,
        threshold=args.threshold,
        max_false_hit_rate=args.max_false_hit_rate,
        fmt=args.format,
        target=args.target,
        api_key=args.api_key,
        concurrency=args.concurrency,
        seed=args.seed,
        examples=args.examples,
    )
    return asyncio.run(evaluate(options, out, sys.stderr))


def _compare(args: argparse.Namespace, out: TextIO) -> int:
    settings = ("in-domain", "lodo") if args.setting == "both" else (args.setting,)
    try:
        results = comparison.compare(
            models=[m.strip() for m in args.models.split(",") if m.strip()],
            settings=settings,
            data=parse_data_sets(args.data or ",".join(DATA_SETS)),
            data_dir=args.data_dir,
            lodo_dir=args.lodo_dir,
            target=args.target_false_hit_rate,
            threads=os.cpu_count() or 1,
            own_calibration=args.calibrate_on_data,
        )
    except (IntentDataError, comparison.ComparisonError, ModelError) as exc:
        raise EvalError(str(exc)) from None
    comparison.render(results, args.format, out, args.target_false_hit_rate)
    return 0
