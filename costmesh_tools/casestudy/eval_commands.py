"""`costmesh eval`: the quality gate. A held-out set of requests with reference answers
runs through a mesh in the control arm (each feature's baseline model, no cache, no
routing) and the treatment arm (its configured cache, routing and budgets); the answers
are scored against the references, and the command exits 1 when the treatment's mean
score is more than `--margin` (relative) below control's.

Exit codes: 0 the treatment passes, 1 it does not (the reasons and the features below
the margin are printed), 2 bad input or a run that cannot give a verdict (a mesh that
fails or cannot be reached, a file that cannot be read or written).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import re
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc

from costmesh.inference.v1 import inference_pb2_grpc
from costmesh_tools.cache.stock import minilm_encoder
from costmesh_tools.casestudy.eval_match import MatchScorer, match_features
from costmesh_tools.casestudy.eval_report import SCORERS, report, write_csv
from costmesh_tools.casestudy.eval_runs import EvalAbortError, MeshClient, Run
from costmesh_tools.casestudy.evaluate import (
    DEFAULT_MARGIN,
    TIER_PREFIX,
    Pair,
    SimilarityScorer,
    compare,
    label_features,
    score_by_grades,
    score_by_similarity,
    score_exactly,
)
from costmesh_tools.casestudy.progress import Progress
from costmesh_tools.casestudy.workload import WorkloadError, WorkloadRequest, read_workload
from costmesh_tools.cli_support import add_tls_arguments, open_aio_channel, positive

CONNECT_SECONDS = 10.0
# An experiment name is also the treatment's cache namespace: the characters both allow.
_EXPERIMENT = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def register(commands: Any) -> None:
    """Add `costmesh eval` to the costmesh parser."""
    ev = commands.add_parser("eval", help="the quality gate: treatment against control")
    ev.add_argument("workload", type=Path, help="a .jsonl or .jsonl.gz workload; only "
                    "requests with a reference are run")  # fmt: skip
    ev.add_argument("--address", "--addr", dest="address", default="127.0.0.1:50051",
                    help="HOST:PORT of the mesh (default %(default)s)")  # fmt: skip
    ev.add_argument("--key", default=os.environ.get("COSTMESH_API_KEY", ""),
                    help="API key (default: $COSTMESH_API_KEY)")  # fmt: skip
    add_tls_arguments(ev)
    ev.add_argument("--margin", default=str(DEFAULT_MARGIN),
                    help="the largest drop of the treatment's mean score relative to "
                    "control's that passes, in [0, 1) (default %(default)s)")  # fmt: skip
    ev.add_argument("--scorer", choices=tuple(SCORERS), default="auto",
                    help="auto (default: exact where references are labels, match where "
                    "they are labelled free text, similarity elsewhere), exact, match, "
                    "similarity or judge")  # fmt: skip
    ev.add_argument("--waive", action="append", default=[], metavar="SLICE",
                    help="a feature (or tier:NAME) whose own drop over the margin does not "
                    "fail the gate (repeatable; the overall drop still counts)")  # fmt: skip
    ev.add_argument("--detect", type=float, metavar="DROP",
                    help="print the requests needed to detect this drop")  # fmt: skip
    ev.add_argument("--judge-feature", default="",
                    help="the feature whose baseline model grades (--scorer judge)")  # fmt: skip
    ev.add_argument("--features", default="", help="only these features, comma-separated")
    ev.add_argument("--limit", type=positive, help="only the first N requests (by time)")
    ev.add_argument("--concurrency", type=positive, default=8, help="calls in flight")
    ev.add_argument("--timeout", type=positive, default=120, help="seconds per call")
    ev.add_argument("--experiment", default="",
                    help="the experiment the calls are recorded under (default: "
                    "eval-<time>-<random>)")  # fmt: skip
    ev.add_argument("--out", type=Path, help="CSV of every request's answers and scores")
    ev.add_argument("--format", choices=("table", "markdown"), default="table")
    ev.add_argument("--model-dir", type=Path, default=None,
                    help="where the ONNX export of the embedding model is kept")  # fmt: skip
    ev.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace, out: TextIO) -> int:
    """Exit 1 means only "the treatment is below the margin": a failure of the
    infrastructure is no verdict, so exit 2 (not the general mapping's 1)."""
    try:
        return _evaluate(args, out)
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "RPC"
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"costmesh: {code}: {details}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"costmesh: {exc}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace, out: TextIO) -> int:
    margin = parse_margin(args.margin)
    experiment = args.experiment or _new_experiment()
    _check_options(args, experiment)
    requests = select(read_workload(args.workload), args.features, args.limit)
    slices = {r.feature for r in requests} | {TIER_PREFIX + r.tier for r in requests if r.tier}
    unknown = sorted(set(args.waive) - slices)
    if unknown:
        raise WorkloadError(f"--waive: no request of feature or tier {unknown[0]!r} is evaluated")
    plan = _scoring(args.scorer, requests)
    embed = None
    if plan.match or plan.similarity:  # load the model before anything is spent
        embed = minilm_encoder(os.cpu_count() or 1, args.model_dir).embed_vectors
    sys.stderr.write(
        f"costmesh eval: {len(requests)} requests in both arms of experiment {experiment} "
        f"at {args.address}\n"
    )
    pairs = asyncio.run(_run(args, experiment, requests))
    if args.scorer == "judge":
        score_by_grades(pairs)
    score_exactly(pairs, plan.exact)
    if embed is not None:
        MatchScorer(embed).score(pairs, plan.match)
        score_by_similarity(pairs, SimilarityScorer(embed), only=plan.similarity)
    comparison = compare(pairs, margin, waived=args.waive)
    if args.out is not None:
        write_csv(args.out, pairs)
    heading = (
        f"experiment {experiment}: {len(pairs)} requests of {args.workload} in both arms, "
        f"scored by {SCORERS[args.scorer]}"
    )
    if args.scorer == "auto":
        for how, features in (("exactly", plan.exact), ("by match", plan.match)):
            heading += f"; {how}: {', '.join(sorted(features))}" if features else ""
    report(out, comparison, pairs, heading, args.format, detect=args.detect)
    return 0 if comparison.passed else 1


@dataclass(frozen=True)
class ScoringPlan:
    """Which features each scorer scores (the judge's grades score the rest)."""

    exact: frozenset[str] = frozenset()
    match: frozenset[str] = frozenset()
    similarity: frozenset[str] = frozenset()


def _scoring(scorer: str, requests: Sequence[WorkloadRequest]) -> ScoringPlan:
    """auto: labels exactly, labelled free text by match, the rest by similarity; a
    named scorer scores every feature, and `match` refuses a feature it cannot judge."""
    features = frozenset(r.feature for r in requests)
    if scorer == "auto":
        exact = frozenset(label_features(requests))
        match = frozenset(match_features(requests)) - exact
        return ScoringPlan(exact, match, features - exact - match)
    if scorer == "match":
        # Label references (escalate, resolve) repeat across intents: nothing to match.
        unjudged = sorted(features - (match_features(requests) - label_features(requests)))
        if unjudged:
            raise WorkloadError(
                f"--scorer match: feature {unjudged[0]!r} needs free-text references with a "
                "label on every request and at least two labels (auto scores label "
                "references exactly)"
            )
    return ScoringPlan(**{scorer: features}) if scorer != "judge" else ScoringPlan()


def parse_margin(text: str) -> float:
    try:
        margin = float(text)
    except ValueError:
        raise WorkloadError(f"--margin: not a number: {text!r}") from None
    if not 0 <= margin < 1:
        raise WorkloadError(f"--margin: must be at least 0 and below 1, got {text}")
    return margin


def _new_experiment() -> str:
    now = datetime.datetime.now(datetime.UTC)
    return f"eval-{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def _check_options(args: argparse.Namespace, experiment: str) -> None:
    if not args.key:
        raise WorkloadError("--key (or COSTMESH_API_KEY) is required")
    if args.detect is not None and not 0 < args.detect < 1:
        raise WorkloadError(f"--detect: a drop in (0, 1), such as 0.08; got {args.detect}")
    if args.scorer == "judge" and not args.judge_feature:
        raise WorkloadError("--scorer judge needs --judge-feature")
    if args.judge_feature and args.scorer != "judge":
        raise WorkloadError("--judge-feature is only used with --scorer judge")
    if not _EXPERIMENT.fullmatch(experiment):
        raise WorkloadError("--experiment: letters, digits and ._:- only, at most 64")
    if args.out is not None and not args.out.parent.is_dir():
        raise WorkloadError(f"--out: {args.out.parent} is not a folder")


def select(
    requests: Sequence[WorkloadRequest], features: str, limit: int | None
) -> list[WorkloadRequest]:
    """The requests with a reference, of the features named (all when none), the first
    `limit` of them; WorkloadError when that leaves none."""
    chosen = [r for r in requests if r.reference is not None]
    if not chosen:
        raise WorkloadError("no request has a reference answer to score against")
    wanted = {f.strip() for f in features.split(",") if f.strip()}
    unknown = sorted(wanted - {r.feature for r in chosen})
    if unknown:
        known = ", ".join(sorted({r.feature for r in chosen}))
        raise WorkloadError(
            f"--features: no request of {', '.join(unknown)} has a reference (those that "
            f"do: {known})"
        )
    if wanted:
        chosen = [r for r in chosen if r.feature in wanted]
    return chosen[:limit]


async def _run(
    args: argparse.Namespace, experiment: str, requests: Sequence[WorkloadRequest]
) -> list[Pair]:
    async with open_aio_channel(args.address, args) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_SECONDS)
        except TimeoutError:
            raise EvalAbortError(f"no mesh answers at {args.address}") from None
        mesh = MeshClient(
            inference_pb2_grpc.InferenceServiceStub(channel),
            (("authorization", f"Bearer {args.key}"),),
            float(args.timeout),
            asyncio.Semaphore(args.concurrency),
        )
        run = Run(experiment)
        pairs = await run.pairs(mesh, requests, Progress("eval"))
        if args.scorer == "judge":
            await run.judge(mesh, args.judge_feature, pairs, Progress("judge"))
    return pairs
