"""The `costmesh` command: serve the mesh (or one service of it) and make API keys."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from services import SERVICES
from services.common.auth import ROLES, hash_key, new_key
from services.common.config import ConfigError, load_config

log = logging.getLogger("costmesh")
# Each client command's module, imported only when that command is named: `costmesh
# --help` (or another command's) does not load the mesh, the models or the SDKs.
_COMMANDS = {
    "ledger": ("costmesh_tools.ledger.commands", "chargeback reports from a running ledger"),
    "economics": ("costmesh_tools.ledger.commands", "self-hosting and fine-tuning arithmetic"),
    "cache": ("costmesh_tools.cache.commands", "semantic cache tools"),
    "router": ("costmesh_tools.router.commands", "train and evaluate the complexity router"),
    "workload": ("costmesh_tools.casestudy.workload_commands",
                 "build and inspect recorded workloads"),
    "eval": ("costmesh_tools.casestudy.eval_commands",
             "the quality gate: treatment against control"),
    "replay": ("costmesh_tools.casestudy.replay_commands",
               "replay a workload under the baseline and the optimised policy"),
    "demo": ("costmesh_tools.casestudy.replay_commands",
             "start the mesh in process and replay the bundled support workload"),
    "certs": ("costmesh_tools.certs", "TLS certificates for development"),
}  # fmt: skip


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="costmesh", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the mesh, or one service of it")
    serve_cmd.add_argument(
        "service",
        nargs="?",
        default="all",
        choices=("all", *SERVICES),
        help="which service to run (default: all four in one process)",
    )
    serve_cmd.add_argument("--port", type=int, help="port to listen on (0 picks a free one)")
    serve_cmd.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve_cmd.add_argument(
        "--http-port",
        type=int,
        help="port of the OpenAI-compatible HTTP front door (default 8080; 0: off)",
    )
    serve_cmd.add_argument("--config", help="TOML file merged over the embedded defaults")
    keys_cmd = commands.add_parser("keys", help="API key tools")
    keys_sub = keys_cmd.add_subparsers(dest="keys_command", required=True)
    new_cmd = keys_sub.add_parser("new", help="make a key and print its config entry")
    new_cmd.add_argument("--team", required=True)
    new_cmd.add_argument("--role", choices=ROLES, default="member")
    new_cmd.set_defaults(handler=_new_key)
    named = next((a for a in argv if not a.startswith("-")), "")
    if named in _COMMANDS:
        importlib.import_module(_COMMANDS[named][0]).register(commands)
    for name, (_, about) in _COMMANDS.items():
        if name not in commands.choices:  # listed by --help; loaded when named
            commands.add_parser(name, help=about)
    return parser


async def _serve(args: argparse.Namespace) -> int:
    from opentelemetry import metrics, trace  # noqa: PLC0415 - the mesh loads when it runs

    from services.common import telemetry  # noqa: PLC0415
    from services.common.metrics import setup_metrics  # noqa: PLC0415
    from services.common.server import serve  # noqa: PLC0415
    from services.mesh import start_mesh  # noqa: PLC0415

    env = dict(os.environ)
    if args.host:
        env["COSTMESH_HOST"] = args.host
    if args.http_port is not None:
        env["COSTMESH_HTTP_PORT"] = str(args.http_port)
    config = load_config(args.config, env)
    names = list(SERVICES) if args.service == "all" else [args.service]
    provider = telemetry.setup_tracing(
        "costmesh" if args.service == "all" else f"costmesh-{args.service}", env
    )
    trace.set_tracer_provider(provider)
    metering = setup_metrics(
        "costmesh" if args.service == "all" else f"costmesh-{args.service}", env
    )
    metrics.set_meter_provider(metering.provider)
    try:
        http_port = config.section("server").get_int("http_port", 0, minimum=0)
        running = await start_mesh(
            config, env, names, provider, port=args.port, http_port=http_port or None,
            metering=metering,
        )  # fmt: skip
        host = config.section("server").get_str("host")
        # One machine-readable line: scripts and tests wait for it to learn the port.
        print(f"costmesh: serving {args.service} on {host}:{running.port}", flush=True)
        if running.http_port:
            scheme = (
                "https"
                if config.section("server").section("tls").get_str("cert_file", "")
                else "http"
            )
            where = f"{scheme}://{host}:{running.http_port}"
            api = f"OpenAI-compatible API at {where}/v1, " if "inference" in names else ""
            print(f"costmesh: {api}metrics at {where}/metrics", flush=True)
        await serve(running, config.section("server").get_float("grace_seconds"))
    finally:
        provider.shutdown()
        metering.shutdown()
    return 0


def _run_command(args: argparse.Namespace) -> int:
    """A client command (ledger, cache, router): errors as one line and an exit code."""
    import grpc  # noqa: PLC0415

    try:
        return int(args.handler(args, sys.stdout))
    except grpc.RpcError as exc:
        print(f"costmesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
        addr = str(getattr(args, "addr", ""))
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED and addr:
            print(
                f"costmesh: {addr} does not serve that service: with the services "
                "split, point --addr at the process that does (the mesh's peers.cache, "
                "peers.router and peers.ledger, or CACHE_ADDR, ROUTER_ADDR, LEDGER_ADDR)",
                file=sys.stderr,
            )
        return 1
    except (ValueError, ArithmeticError) as exc:
        print(f"costmesh: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be written, a ledger that never caught up
        print(f"costmesh: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    except SystemExit as exc:  # argparse has printed why
        return int(exc.code or 0)
    level = os.environ.get("COSTMESH_LOG_LEVEL", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        print(
            f"costmesh: configuration error: COSTMESH_LOG_LEVEL: unknown level {level!r}",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The openai SDK's HTTP client logs every request at INFO: too much for a service.
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command != "serve":
        return _run_command(args)
    return _run_serve(args)


def _new_key(args: argparse.Namespace, out: TextIO) -> int:
    key = new_key()
    out.write(f"key (give it to the team; it is not stored): {key}\n")
    out.write(f'[[auth.keys]]\nteam = "{args.team}"\nrole = "{args.role}"\n')
    out.write(f'sha256 = "{hash_key(key)}"\n')
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_serve(args))
    except ConfigError as exc:
        print(f"costmesh: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"costmesh: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
