"""`costmesh replay` (a workload through a running mesh, then the savings report) and
`costmesh demo` (the same on the bundled workload, with the mesh started in process)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import os
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import grpc

from costmesh.ledger.v1 import ledger_pb2
from costmesh_tools.casestudy import ablation, replay
from costmesh_tools.casestudy.progress import Progress
from costmesh_tools.casestudy.report import SavingsReport, build_report
from costmesh_tools.casestudy.report_render import render_csv, render_html, render_terminal
from costmesh_tools.casestudy.support_workload import bundled_workload_path
from costmesh_tools.casestudy.workload import WorkloadRequest, read_workload
from costmesh_tools.cli_support import (
    add_tls_arguments,
    open_aio_channel,
    positive,
    positive_decimal,
)
from services import SERVICES
from services.common.config import Config, load_config
from services.inference.experiments import MAX_EXPERIMENT_NAME

DEMO_KEY = "cm-demo-admin-key"
# The case's platform: 50,000 tickets a day, about four LLM calls each.
CASE_REQUESTS_PER_DAY = 200_000


def register(commands: Any) -> None:
    run = commands.add_parser(
        "replay", help="replay a workload under the baseline and the optimised policy"
    )
    run.add_argument("workload", type=Path, help="a .jsonl or .jsonl.gz workload")
    run.add_argument("--addr", default="127.0.0.1:50051", help="the mesh")
    run.add_argument("--key", default=os.environ.get("COSTMESH_API_KEY", ""),
                     help="API key (default: $COSTMESH_API_KEY)")  # fmt: skip
    run.add_argument("--config", type=Path, help="the mesh's config (for the models' tiers)")
    add_tls_arguments(run)
    _replay_options(run, ablate="off")
    run.set_defaults(handler=_replay)
    demo = commands.add_parser(
        "demo",
        help="start the mesh in process and replay the bundled support workload",
    )
    demo.add_argument("--out", type=Path, default=Path("costmesh-demo"),
                      help="folder for the report and traces (default %(default)s)")  # fmt: skip
    demo.add_argument("--workload", type=Path, default=bundled_workload_path(),
                      help="a .jsonl or .jsonl.gz workload (default: the bundled "
                      "support workload, %(default)s)")  # fmt: skip
    _replay_options(demo, ablate="with --mode both", requests_per_day=CASE_REQUESTS_PER_DAY)
    demo.set_defaults(handler=_demo)


def _replay_options(
    parser: argparse.ArgumentParser, *, ablate: str, requests_per_day: int | None = None
) -> None:
    """`ablate` is the default of --ablate as the help says it: "off", or on "with --mode
    both" (left None, and so decided by the mode)."""
    parser.add_argument("--mode", choices=("both", "split"), default="both",
                        help="both: each request under both policies; split: A/B")  # fmt: skip
    parser.add_argument("--ablate", action=argparse.BooleanOptionalAction,
                        default=False if ablate == "off" else None,
                        help="with --mode both, replay the treatment again without the "
                        "cache and without routing, to measure each lever's share; "
                        f"twice the treatment's calls again (default: {ablate})")  # fmt: skip
    parser.add_argument("--control-share", type=float, default=0.5,
                        help="share of requests in the control arm with --mode split")  # fmt: skip
    parser.add_argument("--speed", default="max",
                        help="'max', or N times the recorded pace (60: 1 h a minute)")  # fmt: skip
    parser.add_argument(
        "--concurrency", type=positive, default=64, help="calls in flight (default %(default)s)"
    )
    parser.add_argument("--experiment", default="",
                        help="a new name (default replay-<UTC time>-<random>)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the A/B split")
    volume = (
        "volume costs are projected to (default: the workload's own, requests over the "
        "hours it spans)"
        if requests_per_day is None
        else "volume costs are projected to (default: 200,000, the case's platform: "
        "50,000 tickets a day, about four LLM calls each)"
    )
    parser.add_argument("--requests-per-day", type=positive_decimal,
                        default=requests_per_day, help=volume)  # fmt: skip
    parser.add_argument("--csv", type=Path, help="also write the report as CSV")
    parser.add_argument("--html", type=Path, help="also write the report as an HTML page")


def _replay(args: argparse.Namespace, out: TextIO) -> int:
    workload = read_workload(args.workload)
    config = load_config(args.config, env={}) if args.config else load_config(env={})
    metadata = (("authorization", f"Bearer {args.key}"),) if args.key else ()
    result = asyncio.run(_run(args.addr, metadata, workload, args, _model_tiers(config)))
    _write(result, args, out)
    return 0


def _demo(args: argparse.Namespace, out: TextIO) -> int:
    workload = read_workload(args.workload)
    args.out.mkdir(parents=True, exist_ok=True)
    args.html = args.html or args.out / "savings-report.html"
    args.csv = args.csv or args.out / "savings-report.csv"
    traces = args.out / "traces.jsonl"
    out.write(
        f"costmesh demo: {len(workload)} support requests from the Bitext data set, under "
        "the baseline and the optimised policy.\nThe provider is the local SIMULATOR "
        "(no API key is used, nothing leaves this machine).\n\n"
    )
    out.flush()
    result = asyncio.run(_demo_run(workload, args, traces))
    _write(result, args, out)
    out.write(
        f"\nTraces of every call: {traces} (OpenTelemetry JSON, one span a line).\n"
        "Run the mesh yourself with `.venv/bin/costmesh serve` (port 50051), then replay\n"
        "any workload against it: `.venv/bin/costmesh replay "
        f"{args.workload} --key {DEMO_KEY}`.\n"
        "Export OPENAI_API_KEY first to use OpenAI instead of the simulator; set\n"
        "OTEL_EXPORTER_OTLP_ENDPOINT to send traces to Jaeger (compose.yaml runs one).\n"
    )
    return 0


async def _demo_run(
    workload: Sequence[WorkloadRequest], args: argparse.Namespace, traces: Path
) -> Replayed:
    """The whole mesh in this process on the embedded defaults, its provider the
    realistic simulator that knows the workload's questions."""
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415 - `--help` stays light
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter  # noqa: PLC0415

    from services.mesh import start_mesh  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as data_dir, traces.open("w") as trace_file:
        overrides = Path(data_dir) / "demo.toml"
        overrides.write_text(
            f"[simulator]\nrealistic = true\nknowledge = {str(args.workload)!r}\n"
            "[server]\nport = 0\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "COSTMESH_"))}
        env["COSTMESH_DATA_DIR"] = data_dir
        config = load_config(overrides, env)
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(
            BatchSpanProcessor(
                ConsoleSpanExporter(
                    out=trace_file, formatter=lambda s: s.to_json(indent=None) + "\n"
                )
            )
        )
        running = await start_mesh(config, env, SERVICES, tracer_provider, port=0)
        try:
            metadata = (("authorization", f"Bearer {DEMO_KEY}"),)
            address = f"127.0.0.1:{running.port}"
            return await _run(address, metadata, workload, args, _model_tiers(config))
        finally:
            await running.stop(grace=5)
            tracer_provider.shutdown()


@dataclass(frozen=True)
class Replayed:
    """The report, and what the replay saw that the ledger's rows cannot say."""

    report: SavingsReport
    outcome: replay.Outcome
    one_arm_only: int | None  # with --mode both: requests answered in one arm only


async def _run(
    address: str,
    metadata: Sequence[tuple[str, str]],
    workload: Sequence[WorkloadRequest],
    args: argparse.Namespace,
    model_tiers: Mapping[str, str],
) -> Replayed:
    experiment = args.experiment or _new_experiment()
    names = _experiment_names(experiment, args)
    planned = replay.plan(workload, args.mode, args.control_share, args.seed)
    speed = None if args.speed == "max" else _speed(args.speed)
    if args.requests_per_day is not None:
        requests_per_day, basis = args.requests_per_day, "given"
    else:  # before anything is sent: a workload too short for a volume is refused
        requests_per_day = replay.requests_per_day(workload)
        basis = replay.volume_basis(workload)
    async with open_aio_channel(address, args) as channel:
        # Also the key's first use: a refused key stops here, nothing sent.
        for name in names:
            recorded = await replay.recorded_calls(channel, metadata, name)
            if recorded:
                raise ValueError(
                    f"experiment {name} already has {recorded} rows in the ledger; "
                    "choose another name"
                )
        outcome = await replay.send_all(
            channel,
            metadata,
            planned,
            experiment,
            concurrency=args.concurrency,
            speed=speed,
            progress=Progress(f"replay {experiment}"),
        )
        if not outcome.answered:
            failed = ", ".join(f"{n} {code}" for code, n in outcome.failures.most_common())
            raise ValueError(f"no call was answered ({failed}): is the mesh running?")
        rows = await replay.ledger_rows(
            channel,
            metadata,
            experiment,
            outcome.answered,
            cost_nano_usd=outcome.confirmed_cost_nano_usd,
        )
        measured: ablation.Ablation | str | None = None
        if args.ablate and outcome.answered < len(planned):
            lost = len(planned) - outcome.answered
            measured = f"no ablation: {lost} calls failed, so the arms' costs differ in requests"
        elif args.ablate:
            measured = await _ablate(
                channel, metadata=metadata, workload=workload, experiment=experiment,
                rows=rows, args=args, speed=speed,
            )  # fmt: skip
    report = build_report(
        rows,
        replay.truth(planned, experiment),
        model_tiers,
        requests_per_day,
        simulated=outcome.simulated > 0,
        basis=basis,
    )
    one_arm = replay.answered_in_one_arm(planned, outcome) if args.mode == "both" else None
    if isinstance(measured, str):
        report = dataclasses.replace(report, notes=(*report.notes, measured))
    elif measured is not None:
        report = dataclasses.replace(report, ablation=measured)
    return Replayed(report, outcome, one_arm)


def _experiment_names(experiment: str, args: argparse.Namespace) -> list[str]:
    """The replay's experiment, then its ablation runs' (with --ablate), each checked."""
    if args.ablate is None:
        args.ablate = args.mode == "both"
    if args.ablate and args.mode != "both":
        raise ValueError("--ablate: needs --mode both (the arms run the same requests)")
    check_experiment(experiment)
    if not args.ablate:
        return [experiment]
    runs = [ablation.experiment_without(experiment, lever) for lever in ablation.LEVERS]
    longest = max(len(run) - len(experiment) for run in runs)
    if len(experiment) + longest > MAX_EXPERIMENT_NAME:
        raise ValueError(
            f"--experiment: at most {MAX_EXPERIMENT_NAME - longest} characters with --ablate "
            f"(its runs add {', '.join(run[len(experiment) :] for run in runs)} to the name)"
        )
    return [experiment, *runs]


async def _ablate(
    channel: grpc.aio.Channel,
    *,
    metadata: Sequence[tuple[str, str]],
    workload: Sequence[WorkloadRequest],
    experiment: str,
    rows: Sequence[ledger_pb2.UsageRecord],
    args: argparse.Namespace,
    speed: float | None,
) -> ablation.Ablation | str:
    """The treatment replayed without each lever, at the replay's own pace (a cache
    holds what the pace lets it); a note instead when a run is not comparable (a call
    failed, a feature has no baseline)."""
    baselines = ablation.baseline_models(rows)
    missing = sorted({r.feature for r in workload} - set(baselines))
    if missing:
        return f"no ablation: feature {missing[0]} has no control answer to take its baseline from"
    treatment = [replay.Planned(r, replay.TREATMENT) for r in workload]
    without = {}
    for lever in ablation.LEVERS:
        name = ablation.experiment_without(experiment, lever)
        outcome = await replay.send_all(
            channel, metadata, treatment, name, concurrency=args.concurrency, speed=speed,
            progress=Progress(f"replay {name}"),
            change=functools.partial(ablation.switch_off, lever=lever, baselines=baselines),
        )  # fmt: skip
        if outcome.answered < len(treatment):
            failed = len(treatment) - outcome.answered
            return f"no ablation: {failed} calls of {name} failed, so its cost is not comparable"
        lever_rows = await replay.ledger_rows(
            channel, metadata, name, outcome.answered,
            cost_nano_usd=outcome.confirmed_cost_nano_usd,
        )  # fmt: skip
        without[lever] = ablation.cost(lever_rows, replay.TREATMENT)
    return ablation.Ablation(
        control=ablation.cost(rows, replay.CONTROL),
        treatment=ablation.cost(rows, replay.TREATMENT),
        without=without,
    )


def _new_experiment() -> str:
    return f"replay-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def check_experiment(name: str) -> None:
    """The mesh's rule for an experiment name, and printable (it is shown in reports)."""
    if len(name) > MAX_EXPERIMENT_NAME:
        raise ValueError(f"--experiment: at most {MAX_EXPERIMENT_NAME} characters")
    if not name.isprintable():
        raise ValueError(f"--experiment: printable characters only, got {name!r}")


def _speed(text: str) -> float:
    try:
        speed = float(text)
    except ValueError:
        speed = 0.0
    if not speed > 0:
        raise ValueError(f"--speed: expected 'max' or a positive number, got {text!r}")
    return speed


def _model_tiers(config: Config) -> Mapping[str, str]:
    from costmesh_simulator.stand_in import model_tiers  # noqa: PLC0415 - loads the simulator

    return model_tiers(config)


def _write(result: Replayed, args: argparse.Namespace, out: TextIO) -> None:
    report, outcome = result.report, result.outcome
    out.write(render_terminal(report))
    failed = sum(outcome.failures.values())
    codes = ", ".join(f"{n} {code}" for code, n in outcome.failures.most_common())
    out.write(
        f"\n{outcome.sent} calls sent, {outcome.answered} answered, {failed} failed"
        f"{f' ({codes})' if codes else ''}; the arms are compared over answered calls only.\n"
    )
    if result.one_arm_only:
        out.write(
            f"{result.one_arm_only} requests were answered in one arm only (failed in the other).\n"
        )
    for path, text in ((args.csv, render_csv), (args.html, render_html)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text(report), encoding="utf-8")
            out.write(f"wrote {path}\n")
