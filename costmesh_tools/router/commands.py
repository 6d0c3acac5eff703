"""`costmesh router train` and `costmesh router eval`.

`train` embeds labelled tickets with the model the router serves with and writes a
versioned artefact. `eval` routes a labelled set at a sweep of the cost/quality knob
and prints what each value buys: accuracy, per-tier precision and recall, the share
sent to each tier, the complex requests sent to a cheaper tier, and the cost of the
routed traffic against all of it on the large model.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from costmesh.types.v1 import types_pb2
from costmesh_tools.cli_support import unit, unit_list, write_grid
from costmesh_tools.router.tickets import DataError, Ticket, default_data_dir, load_tickets
from costmesh_tools.router.training import (
    KnobRow,
    calibration,
    recommend,
    sweep,
    train,
)
from services.common.config import load_config
from services.common.embedding import SentenceEncoder, embed_sorted, shared_encoder
from services.common.pricing import PriceCatalog, Usage
from services.router.artefact import TIERS, TierModel
from services.router.plans import SHIPPED_ARTEFACT, RouterSettings

DEFAULT_KNOBS = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))  # 0.30 .. 0.95
FORMATS = ("table", "markdown", "csv")


def register(commands: Any) -> None:
    router = commands.add_parser("router", help="train and evaluate the complexity router")
    sub = router.add_subparsers(dest="router_command", required=True)
    tr = sub.add_parser("train", help="train the embedding classifier from labelled tickets")
    _data_options(tr)
    tr.add_argument("--out", type=Path, required=True, help="artefact file to write (.npz)")
    tr.add_argument("--c", type=float, default=10.0, help="inverse regularisation strength")
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(handler=_train)
    ev = sub.add_parser("eval", help="route a labelled set at a sweep of the knob")
    _data_options(ev)
    ev.add_argument("--artefact", type=Path, default=SHIPPED_ARTEFACT)
    ev.add_argument("--knobs", type=unit_list, default=DEFAULT_KNOBS,
                    help="comma-separated cheap_tier_min_probability values")  # fmt: skip
    ev.add_argument("--max-complex-below", type=unit, default=0.03,
                    help="largest share of complex requests the recommendation may send "
                    "to a cheaper tier (default 0.03)")  # fmt: skip
    ev.add_argument("--config", help="TOML merged over the embedded defaults (models, prices)")
    ev.add_argument("--feature", default="default", help="whose tier-to-model map is priced")
    ev.add_argument("--prompt-tokens", type=int, default=200,
                    help="system-prompt tokens each request carries")  # fmt: skip
    ev.add_argument("--output-tokens", type=int, default=150, help="tokens of each answer")
    ev.add_argument("--format", choices=FORMATS, default="table")
    ev.add_argument("--ignore-out-of-domain", action="store_true",
                    help="route out-of-domain tickets by their probabilities too, as a router "
                    "without the detection would (for comparison)")  # fmt: skip
    ev.add_argument("--seed", type=int, default=None,
                    help="bitext's split (default: the artefact's own)")  # fmt: skip
    ev.set_defaults(handler=_eval)


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="banking77, bitext, clinc150 (or several, comma-separated), or "
                        ".jsonl/.csv: text, tier[, label]")  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the embedding model's folder (default: the shipped one)")  # fmt: skip


def _embed(
    tickets: Sequence[Ticket], encoder: SentenceEncoder, err: TextIO
) -> npt.NDArray[np.float32]:
    started = time.perf_counter()
    vectors = embed_sorted(encoder.embed_vectors, [t.text for t in tickets])
    err.write(f"embedded {len(tickets)} tickets in {time.perf_counter() - started:.1f} s\n")
    return vectors


def _train(args: argparse.Namespace, out: TextIO) -> int:
    if not args.c > 0:
        raise DataError("--c must be positive")
    tickets = load_tickets(args.data, args.data_dir, args.seed)
    encoder = shared_encoder(args.model_dir, os.cpu_count() or 1)
    vectors = _embed(tickets.train, encoder, sys.stderr)
    started = time.perf_counter()
    trained = train(
        tickets.train, vectors, encoder.model, f"{tickets.name} train", c=args.c, seed=args.seed
    )
    version = trained.model.save(args.out)
    model = trained.model
    by_intent = model.classes != tuple(sorted(set(model.class_tiers)))
    out.write(
        f"trained on {len(tickets.train)} tickets of {tickets.name} "
        f"({len(model.classes)} {'intents' if by_intent else 'tiers'}) "
        f"in {time.perf_counter() - started:.1f} s\n"
        f"held out {trained.holdout_rows}: tier accuracy {trained.holdout_accuracy:.1%}, "
        f"log-loss {trained.holdout_log_loss:.3f} at temperature {trained.temperature:g}\n"
        f"out of domain below similarity {model.ood_min_similarity:.4f} to the nearest intent "
        f"(flags {model.meta['ood_holdout_share']:.0%} of held-out questions), the knob "
        f"raised below {model.familiar_similarity:.4f}; "
        + (
            f"knob chosen on the held-out rows: {model.meta['validation_knob']}\n"
            if model.meta["validation_knob"] is not None
            else "no knob keeps the held-out complex requests on complex: raise it by hand\n"
        )
        + f"wrote {args.out} (version {version})\n"
        f'use it: [router] artefact = "{args.out}" (or features.X.router_artefact); '
        f"measure it: costmesh router eval --artefact {args.out} --data ...\n"
    )
    return 0


@dataclass(frozen=True)
class _Costs:
    models: dict[str, str]
    per_request: dict[str, npt.NDArray[np.float64]]
    note: str


def _costs(args: argparse.Namespace, tickets: Sequence[Ticket]) -> _Costs:
    from services.inference.validation import estimate_tokens  # noqa: PLC0415 - the SDK's types

    config = load_config(args.config, dict(os.environ))
    settings = RouterSettings.from_config(config)
    plan = settings.plans.get(args.feature)
    if plan is None:
        raise DataError(f"--feature: no feature {args.feature!r} in the configuration")
    if args.prompt_tokens < 0 or args.output_tokens < 0:
        raise DataError("--prompt-tokens and --output-tokens must not be negative")
    version = config.section("ledger").get_str("price_version")
    catalog = PriceCatalog.from_config(config.section("models"), version)
    now = datetime.datetime.now(datetime.UTC)
    per_request = {}
    for tier in TIERS:
        costs = [
            catalog.cost(
                plan.models[tier],
                Usage(args.prompt_tokens + estimate_tokens([_ticket(t)]), 0, args.output_tokens),
                now,
            ).cost_nano_usd
            / 1e9
            for t in tickets
        ]
        per_request[tier] = np.array(costs, dtype=np.float64)
    note = (
        f"cost: each request is the ticket plus {args.prompt_tokens} prompt tokens and "
        f"{args.output_tokens} answer tokens at price catalog {version}; tiers -> "
        + ", ".join(f"{t}: {plan.models[t]}" for t in TIERS)
    )
    return _Costs(plan.models, per_request, note)


def _ticket(ticket: Ticket) -> types_pb2.ChatMessage:
    return types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=ticket.text)


def _eval(args: argparse.Namespace, out: TextIO) -> int:
    model = TierModel.load(args.artefact)
    seed = args.seed if args.seed is not None else int(model.meta.get("seed", 0))
    tickets = load_tickets(args.data, args.data_dir, seed)
    encoder = shared_encoder(args.model_dir, os.cpu_count() or 1)
    if model.embedding_model != encoder.model:
        raise DataError(
            f"{args.artefact}: trained on {model.embedding_model}; eval embeds with {encoder.model}"
        )
    costs = _costs(args, tickets.test)
    vectors = _embed(tickets.test, encoder, sys.stderr)
    probabilities = model.tier_probabilities(vectors)
    truth = [t.tier for t in tickets.test]
    unfamiliar = model.unfamiliarity(vectors)
    ood = unfamiliar >= 1.0
    if args.ignore_out_of_domain:  # what the classifier alone would do, for comparison
        unfamiliar[:] = 0.0
    knobs = sorted({*args.knobs, *([validated] if (validated := _validated(model)) else [])})
    rows = sweep(probabilities, truth, knobs, costs.per_request, unfamiliar)
    # The knob is the one chosen on the artefact's held-out rows, never on this set;
    # an artefact from before that was recorded falls back to the best here (said so).
    best = next((r for r in rows if r.knob == validated), None)
    chosen_on = "the artefact's held-out (validation) rows"
    if best is None:
        best, chosen_on = recommend(rows, args.max_complex_below), "this set (no validation knob)"
    name = "test" if tickets.test is not tickets.train else "all rows"
    out.write(
        f"router eval: artefact {model.version} ({model.meta.get('source', '?')}) on "
        f"{tickets.name} {name}, {len(tickets.test)} tickets\n{costs.note}\n"
        + (
            "out of domain: not applied (--ignore-out-of-domain)\n\n"
            if args.ignore_out_of_domain
            else f"out of domain: {int(ood.sum())} of {len(ood)} ({ood.mean():.1%}) below "
            f"similarity {model.ood_min_similarity:.2f} to the nearest intent, "
            "routed to complex; " + _unfamiliar_note(model, unfamiliar, ood)
        )
    )
    _write_rows(out, rows, best, args.format)
    if args.format == "csv":
        return 0
    _write_calibration(out, probabilities, truth, args.format)
    if best is None:
        out.write(
            f"\nno knob keeps complex requests on cheaper tiers at or below "
            f"{args.max_complex_below:.1%}: raise the knob or retrain\n"
        )
        return 0
    if best.complex_below > args.max_complex_below:
        out.write(
            f"\nWARNING: at the knob chosen on validation, {best.complex_below:.1%} of this "
            f"set's complex requests go cheaper, over the {args.max_complex_below:.1%} bound: "
            "this set is not like the training data (retrain on it, or raise the knob)\n"
        )
    out.write(
        f"\ncheap_tier_min_probability = {best.knob:.2f}, chosen on {chosen_on}: "
        f"{best.cheap_share:.1%} of traffic on cheaper tiers, complex routed below complex "
        f"{best.complex_below:.1%} (bound {args.max_complex_below:.1%}); tier accuracy "
        f"{best.accuracy:.1%}; cost {best.savings:.1%} below all-on-{costs.models['complex']}\n\n"
        f"confusion at {best.knob:.2f} (rows: true tier, columns: routed tier)\n\n"
    )
    header = ["true \\ routed", *TIERS, "recall"]
    lines = [
        [tier, *(str(int(v)) for v in best.confusion[i]), f"{best.recall(i):.1%}"]
        for i, tier in enumerate(TIERS)
    ]
    lines.append(["precision", *(f"{best.precision(i):.1%}" for i in range(len(TIERS))), ""])
    write_grid(out, header, lines, args.format)
    return 0


def _unfamiliar_note(
    model: TierModel, unfamiliar: npt.NDArray[np.float64], ood: npt.NDArray[np.bool_]
) -> str:
    if not model.familiar_similarity:
        return "no familiar similarity in this artefact: the knob is never raised\n\n"
    edge = (unfamiliar > 0) & ~ood
    return (
        f"{int(edge.sum())} ({edge.mean():.1%}) between it and {model.familiar_similarity:.2f}, "
        "the knob raised toward 1 as they near the bar\n\n"
    )


def _validated(model: TierModel) -> float | None:
    knob = model.meta.get("validation_knob")
    return float(knob) if isinstance(knob, int | float) else None


def _write_calibration(
    out: TextIO, probabilities: npt.NDArray[np.floating], truth: Sequence[str], fmt: str
) -> None:
    """Reliability of the cheap score: does P(below complex) = 0.8 mean 80%?"""
    error, bins = calibration(probabilities, truth)
    out.write(f"\ncalibration of P(below complex): expected calibration error {error:.3f}\n\n")
    header = ["P(below complex)", "tickets", "mean predicted", "truly below complex"]
    lines = [
        [f"{b.low:.1f}-{b.high:.1f}", str(b.rows), f"{b.predicted:.3f}", f"{b.observed:.3f}"]
        for b in bins
    ]
    write_grid(out, header, lines, fmt)


def _write_rows(out: TextIO, rows: Sequence[KnobRow], best: KnobRow | None, fmt: str) -> None:
    header = [
        "knob", "accuracy",
        *(f"{t} P/R" for t in TIERS),
        *(f"-> {t}" for t in TIERS),
        "complex below", "cost USD", "all-large USD", "savings",
    ]  # fmt: skip
    lines = []
    for row in rows:
        mark = "*" if row is best else ""
        lines.append(
            [
                f"{mark}{row.knob:.2f}",
                f"{row.accuracy:.1%}",
                *(f"{row.precision(i):.0%}/{row.recall(i):.0%}" for i in range(len(TIERS))),
                *(f"{row.share(i):.1%}" for i in range(len(TIERS))),
                f"{row.complex_below:.1%}",
                f"{row.cost:.4f}",
                f"{row.large_cost:.4f}",
                f"{row.savings:.1%}",
            ]
        )
    if fmt == "csv":
        out.write(",".join(header) + "\n")
        for line in lines:
            out.write(",".join(x.lstrip("*") for x in line) + "\n")
        return
    write_grid(out, header, lines, fmt)
    out.write("* the knob in use (see below)\n")
