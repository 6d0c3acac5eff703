"""`costmesh workload generate` and `costmesh workload show`.

`generate` builds a support workload of any size from Bitext's held-out tickets (the
bundled one is `make workload`); `show` says what a workload holds before it is
replayed: requests per feature, the tier mix and how often questions repeat.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from costmesh_tools.casestudy.support_workload import BUNDLED_REQUESTS, BUNDLED_SEED, generate
from costmesh_tools.casestudy.workload import (
    WorkloadRequest,
    check_suffix,
    read_workload,
    write_workload,
)
from costmesh_tools.cli_support import positive, write_grid
from costmesh_tools.router.tickets import default_data_dir
from services.router.artefact import TIERS


def register(commands: Any) -> None:
    workload = commands.add_parser("workload", help="build and inspect recorded workloads")
    sub = workload.add_subparsers(dest="workload_command", required=True)
    gen = sub.add_parser("generate", help="a support workload from Bitext's held-out tickets")
    gen.add_argument("--requests", type=positive, default=BUNDLED_REQUESTS)
    gen.add_argument("--seed", type=int, default=BUNDLED_SEED)
    gen.add_argument("--out", type=Path, required=True, help="file to write (.jsonl or .jsonl.gz)")
    gen.add_argument("--data-dir", type=Path, default=default_data_dir(),
                     help="the folder holding bitext_customer_support/")  # fmt: skip
    gen.add_argument("--days", type=positive, default=1, help="days the requests spread over")
    gen.set_defaults(handler=_generate)
    show = sub.add_parser("show", help="what a workload file holds")
    show.add_argument("path", type=Path, help="a .jsonl or .jsonl.gz workload")
    show.set_defaults(handler=_show)


def _generate(args: argparse.Namespace, out: TextIO) -> int:
    check_suffix(args.out)
    requests = generate(args.requests, args.seed, args.data_dir, args.days)
    write_workload(args.out, requests)
    days = f"{args.days} day{'s' if args.days > 1 else ''}"
    out.write(f"wrote {len(requests)} requests over {days} (seed {args.seed}) to {args.out}\n")
    return 0


def _show(args: argparse.Namespace, out: TextIO) -> int:
    requests = read_workload(args.path)
    total = len(requests)
    first, last = requests[0].timestamp, requests[-1].timestamp
    teams = sorted({r.team for r in requests})
    out.write(
        f"{args.path}: {total} requests from {first.isoformat()} to {last.isoformat()}, "
        f"team{'s' if len(teams) > 1 else ''} {', '.join(teams)}\n\n"
    )
    features = Counter(r.feature for r in requests)
    _counts(out, "feature", sorted(features.items(), key=lambda kv: (-kv[1], kv[0])), total)
    out.write("\n")
    tiers = Counter(r.tier or "(none)" for r in requests)
    order = [*TIERS, "(none)"]
    _counts(out, "tier", sorted(tiers.items(), key=lambda kv: order.index(kv[0])), total)
    questions = len({r.question for r in requests})
    out.write(
        f"\ndistinct questions: {questions} (last user message)\n"
        f"exact repeats: {_repeat_share(requests):.1%} of requests have the feature and "
        f"messages of an earlier one\n"
    )
    return 0


def _counts(out: TextIO, name: str, rows: Sequence[tuple[str, int]], total: int) -> None:
    lines = [[key, str(n), f"{n / total:.1%}"] for key, n in rows]
    write_grid(out, [name, "requests", "share"], lines, "table")


def _repeat_share(requests: Sequence[WorkloadRequest]) -> float:
    seen: set[tuple[object, ...]] = set()
    repeats = 0
    for request in requests:
        key = (request.feature, request.messages)
        repeats += key in seen
        seen.add(key)
    return repeats / len(requests)
