"""Ledger benchmarks on SQLite and on PostgreSQL (when one answers).

1. Ingest: RecordUsage's store path (`record`, with its rollup upkeep), batches of
   500, in records per second.
2. Report: a 30-day spend-by-team-and-feature over 6,000,000 rows (the case study:
   ~195,000 calls a day, five features). The rows are bulk-loaded, then the daily
   rollup is built by the same statement the schema migration uses; the timed query
   is the store's own `spend`, with partial days at both ends of the range.

    .venv/bin/python bench/ledger.py [--rows 6000000] [--postgres postgresql://...]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from services.ledger.rows import COLUMNS, DAY_US, ROLLUP_REBUILD, UsageRow, UsageStore
from services.ledger.stores import open_store

START = int(datetime(2026, 10, 1, tzinfo=UTC).timestamp() * 1_000_000)
TEAMS = [f"team-{i}" for i in range(12)]
FEATURES = ["tickets", "kb-search", "summaries", "triage", "drafts"]
MODELS = ["gpt-4o-mini", "gpt-4o"]
TEMPLATE = UsageRow(
    request_id="", trace_id="0" * 32, time_us=0, day="", team="", feature="", model="",
    provider="openai", tier=1, input_tokens=0, cached_input_tokens=0, output_tokens=0,
    cache_outcome=1, escalated=False, batch=False, latency_ms=900, status=1, cost_nano_usd=0,
    price_version="bench", baseline_model="gpt-4o",
)  # fmt: skip


def rows(count: int, days: int, seed: int = 7) -> Iterator[UsageRow]:
    rng = random.Random(seed)
    for i in range(count):
        time_us = START + rng.randrange(days * DAY_US)
        cost = rng.randrange(5_000_000)
        yield replace(
            TEMPLATE,
            request_id=f"r{i}",
            time_us=time_us,
            day=datetime.fromtimestamp(time_us / 1e6, UTC).strftime("%Y-%m-%d"),
            team=rng.choice(TEAMS),
            feature=rng.choice(FEATURES),
            model=MODELS[rng.random() < 0.3],
            tier=rng.choice((1, 1, 2, 3)),
            input_tokens=rng.randrange(2000),
            output_tokens=rng.randrange(600),
            cache_outcome=rng.choice((1, 1, 2, 3)),
            cost_nano_usd=cost,
            counterfactual_cost_nano_usd=cost * 3,
        )


def ingest(store: UsageStore, count: int) -> float:
    batch: list[UsageRow] = []
    began = time.perf_counter()
    for row in rows(count, 30, seed=11):
        batch.append(replace(row, request_id="ingest-" + row.request_id))
        if len(batch) == 500:
            store.record(batch)
            batch = []
    if batch:
        store.record(batch)
    return count / (time.perf_counter() - began)


def bulk_load_sqlite(path: Path, count: int) -> None:
    with sqlite3.connect(path) as db:
        marks = ", ".join("?" for _ in COLUMNS)
        db.executemany(
            f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({marks})",  # noqa: S608
            (r.values() for r in rows(count, 30)),
        )
        db.execute("DELETE FROM usage_daily")
        db.execute(ROLLUP_REBUILD)


def bulk_load_postgres(url: str, count: int) -> None:
    with psycopg.connect(url) as db:
        with db.cursor().copy(f"COPY usage ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for row in rows(count, 30):
                copy.write_row(row.values())
        db.execute("DELETE FROM usage_daily")
        db.execute(ROLLUP_REBUILD)
        db.execute("ANALYZE")


def report_seconds(store: UsageStore, start: int, end: int) -> tuple[float, int]:
    timings, groups = [], 0
    for _ in range(5):
        began = time.perf_counter()
        totals = store.spend(("team", "feature"), start, end)
        timings.append(time.perf_counter() - began)
        groups = len(totals)
    return statistics.median(timings), groups


def run(
    name: str, database: str, data_dir: Path, count: int, load: Callable[[Any, int], None]
) -> None:
    store = open_store(database, data_dir)
    try:
        rate = ingest(store, 50_000)
        began = time.perf_counter()
        load(database if name == "postgres" else data_dir / database, count)
        loaded = time.perf_counter() - began
        # Whole days (what --from/--to ask for) read only the rollup; a range that
        # starts and ends mid-day also reads the raw rows of its two partial days.
        days, groups = report_seconds(store, START, START + 30 * DAY_US)
        edges, _ = report_seconds(store, START + DAY_US // 3, START + 30 * DAY_US - DAY_US // 3)
    finally:
        store.close()
    print(
        f"{name:9} ingest {rate:8,.0f} records/s (batches of 500) | "
        f"{count:,} rows loaded in {loaded:.0f} s | 30-day team x feature report "
        f"({groups} groups), median of 5: whole days {days * 1000:.1f} ms, "
        f"mid-day edges {edges * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6_000_000)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run("sqlite", "ledger.sqlite3", Path(tmp), args.rows, bulk_load_sqlite)
    schema = f"bench_{int(time.time())}"
    try:
        admin = psycopg.connect(args.postgres, autocommit=True)
    except psycopg.OperationalError as exc:
        print(f"postgres  skipped: {exc}")
        return
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            url = f"{args.postgres}?options=-csearch_path%3D{schema}"
            run("postgres", url, Path(), args.rows, bulk_load_postgres)
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
