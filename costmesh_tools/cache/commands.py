"""`costmesh cache train`, `costmesh cache report-wrong-hit` (and `cache eval`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_tools.cache import evaluate
from costmesh_tools.cache.intents import default_data_dir, parse_data_sets
from costmesh_tools.cache.stock import minilm_dir
from costmesh_tools.cli_support import add_tls_arguments, count, open_channel
from services.common.embedding import read_card

SHIPPED_DATA = "banking77,clinc150,bitext"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = commands.add_parser("cache", help="semantic cache tools")
    sub = cache.add_subparsers(dest="cache_command", required=True)
    evaluate.register(sub)
    tr = sub.add_parser(
        "train",
        help="fine-tune the equivalence model, export it to ONNX and calibrate it "
        "(needs the train extra)",
    )
    tr.add_argument("--data", default=SHIPPED_DATA,
                    help=f"comma-separated data sets (default: {SHIPPED_DATA})")  # fmt: skip
    tr.add_argument("--data-dir", type=Path, default=default_data_dir())
    tr.add_argument("--out", type=Path, required=True,
                    help="model folder to write; serve it with cache.model_dir and "
                    "router.model_dir (make cache-model rewrites the shipped one)")  # fmt: skip
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--epochs", type=count, default=1)
    tr.add_argument("--max-examples", type=count, default=0,
                    help="train on this many questions only (0: all; a quick check)")  # fmt: skip
    tr.add_argument("--no-quantise", action="store_true", help="keep float32 weights")
    tr.add_argument("--calibrate-only", action="store_true",
                    help="keep the model in --out; measure its thresholds again on the "
                    "validation splits of its training data")  # fmt: skip
    tr.set_defaults(handler=_train)
    report = sub.add_parser(
        "report-wrong-hit",
        help="tell the mesh a cached answer was wrong: the entry is dropped and its "
        "partition asks more similarity of later hits",
    )
    report.add_argument("--addr", default="127.0.0.1:50051", help="the mesh (inference)")
    report.add_argument("--key", default=os.environ.get("COSTMESH_API_KEY", ""),
                        help="API key of the team that got the answer "
                        "(default: $COSTMESH_API_KEY)")  # fmt: skip
    report.add_argument("--feature", required=True)
    report.add_argument("--question", required=True, help="the user message that was asked")
    report.add_argument("--entry", required=True, help="the reply's cache_entry_id")
    add_tls_arguments(report)
    report.add_argument("--scope-key", default="")
    report.add_argument("--namespace", default="")
    report.set_defaults(handler=_report)


def _train(args: argparse.Namespace, out: TextIO) -> int:
    from costmesh_tools.cache.training import TrainOptions, train  # noqa: PLC0415 - the train extra

    if args.calibrate_only:
        return _recalibrate(args.out, args.data_dir, out)
    minilm_dir()  # a plain install says which extra it lacks, not a traceback
    options = TrainOptions(
        data_sets=parse_data_sets(args.data),
        data_dir=args.data_dir,
        out=args.out,
        seed=args.seed,
        epochs=args.epochs,
        max_examples=args.max_examples,
        quantise=not args.no_quantise,
    )
    card = train(options)
    size = (args.out / "model.onnx").stat().st_size
    out.write(
        f"wrote {args.out} ({size / 1e6:.1f} MB): {card['name']}@{card['onnx_sha256'][:12]}, "
        f"{card['training']['steps']} steps in {card['training']['seconds']} s\n"
        f"thresholds by false hits per served hit: {json.dumps(card['thresholds'])}\n"
    )
    return 0


def _recalibrate(folder: Path, data_dir: Path, out: TextIO) -> int:
    from costmesh_tools.cache.intents import load_intents  # noqa: PLC0415
    from costmesh_tools.cache.training import recalibrate  # noqa: PLC0415

    card = read_card(folder)
    sets = [load_intents(n, data_dir, card["training"]["seed"]) for n in card["training"]["data"]]
    card = recalibrate(folder, card, sets)
    out.write(f"thresholds by false hits per served hit: {json.dumps(card['thresholds'])}\n")
    return 0


def _report(args: argparse.Namespace, out: TextIO) -> int:
    if not args.key:
        sys.stderr.write("costmesh: --key (or COSTMESH_API_KEY) is required\n")
        return 2
    request = inference_pb2.ReportWrongHitRequest(
        request=inference_pb2.CompleteRequest(
            feature=args.feature,
            scope_key=args.scope_key,
            messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=args.question)],
            cache_control=inference_pb2.CacheControl(namespace=args.namespace),
        ),
        cache_entry_id=args.entry,
    )
    with open_channel(args.addr, args) as channel:
        reply = inference_pb2_grpc.InferenceServiceStub(channel).ReportWrongHit(
            request, metadata=(("authorization", f"Bearer {args.key}"),), timeout=10
        )
    out.write(
        f"dropped entry {args.entry} (similarity {reply.similarity:.4f}); semantic hits of "
        f"this partition now need at least {reply.partition_threshold:.4f}\n"
    )
    return 0
