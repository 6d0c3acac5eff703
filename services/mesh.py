"""Composes the four services into one server (or any subset of them) from one config."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from opentelemetry.sdk.trace import TracerProvider

from costmesh_simulator.stand_in import StandIns, start_stand_ins
from services import SERVICES
from services.cache import service as cache_service
from services.common import telemetry, tls
from services.common.auth import KeyTable, new_key
from services.common.channels import Channels
from services.common.config import Config, ConfigError
from services.common.edge import EdgeInterceptor
from services.common.in_process import InProcessServer
from services.common.metrics import Metering
from services.common.pricing import PRICE_KEYS
from services.common.server import RunningServer, ServiceDef, create_server
from services.front_door.app import FrontDoor
from services.front_door.server import start_http
from services.inference import service as inference_service
from services.ledger import service as ledger_service
from services.router import service as router_service

log = logging.getLogger(__name__)
PEERS = ("cache", "router", "ledger")


# Every key a table of the configuration may hold, so a misspelt key fails the start
# instead of silently meaning its default.
_KNOWN_KEYS = {
    "": {
        "server", "peers", "auth", "providers", "models",
        "ledger", "cache", "features", "inference", "router", "queue", "teams", "simulator",
    },
    "simulator": {"realistic", "latency_scale", "knowledge", "seed"},
    "server": {"host", "port", "http_port", "grace_seconds", "data_dir", "insecure", "tls"},
    "server.tls": {"cert_file", "key_file", "client_ca_file"},
    "peers": {"cache", "router", "ledger", "timeout_seconds", "tls"},
    "peers.tls": {"ca_file", "cert_file", "key_file"},
    "auth": {"service_key_env", "keys"},
    "ledger": {"database", "price_version"},
    "cache": {
        "backend", "redis_url", "redis_prefix", "max_entries", "max_bytes", "ann_threshold",
        "embedding_provider", "embedding_model", "embedding_dimensions", "embedding_threads",
        "model_dir",
    },
    "router": {
        "artefact", "reload_seconds", "calibration_window", "model_dir", "embedding_threads",
    },
    "inference": {
        "outbox", "outbox_retry_seconds", "provider_timeout_seconds",
        "idempotency_ttl_seconds", "batch_store", "batch_poll_seconds",
        "max_attempts", "retry_base_seconds", "retry_max_seconds", "attempt_timeout_seconds",
        "cooldown_failures", "cooldown_seconds", "cooldown_first_seconds",
    },
    "queue": {
        "backend", "redis_url", "redis_prefix", "max_batch", "max_wait_ms", "concurrency",
        "result_ttl_seconds",
    },
    "teams.*": {"daily_usd", "monthly_usd"},
    "providers.*": {"base_url", "api_key_env", "simulate_without_key"},
    "models.*": {"provider", "context_window", "tier", "fallbacks", "price_changes", *PRICE_KEYS},
    "features.*": {
        "tier", "models", "escalation_model", "cache_ttl_seconds", "baseline_model",
        "max_tokens_default", "max_tokens_limit", "max_input_tokens",
        "cache_mode", "cache_similarity_threshold", "cache_target_false_hit_rate",
        "cache_question", "cache_per_tenant", "cache_max_entries", "cache_max_bytes",
        "router", "router_artefact", "router_model", "router_out_of_domain",
        "cheap_tier_min_probability",
        "cheap_share_target", "escalation", "escalation_threshold", "escalation_target_rate",
        "over_budget", "experiment", "control_share",
    },
}  # fmt: skip


def check_keys(config: Config) -> None:
    """Reject keys no part of costmesh reads, naming the first one found."""
    features = config.section("features")
    for name in features.names():
        features.section(name).section("models").reject_unknown({"simple", "moderate", "complex"})
    for path, allowed in _KNOWN_KEYS.items():
        if not path:
            config.reject_unknown(allowed)
        elif path.endswith(".*"):
            group = config.section(path[:-2])
            for name in group.names():
                group.section(name).reject_unknown(allowed)
        else:
            table = config
            for part in path.split("."):
                table = table.section(part)
            table.reject_unknown(allowed)


def _service_key(config: Config, env: Mapping[str, str], names: Sequence[str]) -> str:
    key_env = config.section("auth").get_str("service_key_env")
    key = env.get(key_env, "")
    if key:
        return key
    if set(names) == set(SERVICES):
        return new_key()  # one process: nobody else needs to know it
    raise ConfigError(
        f"auth.service_key_env: set {key_env} (the same value in every service process)"
    )


def _peer_addresses(config: Config, names: Sequence[str], local: str) -> dict[str, str]:
    """Where inference reaches each peer: its configured address, or this process."""
    peers = config.section("peers")
    addresses = {}
    for peer in PEERS:
        address = peers.get_str(peer)
        if not address:
            if peer not in names:
                raise ConfigError(f"peers.{peer}: address required when {peer} runs elsewhere")
            address = local
        else:
            tls.check_peer_plaintext(config, peer, address, tls.peer_tls(config))
        addresses[peer] = address
    return addresses


# SHA-256 of "cm-demo-admin-key", the key the embedded defaults ship for newcomers.
DEMO_KEY_DIGEST = "47a6045eb3aa6a2edbaa67b4e97cbc6761bb966681d0a6c10c4e96ae2636018b"


def _refuse_demo_key_off_loopback(config: Config, host: str) -> None:
    """The demo key is public: it may only open a mesh nobody else can reach."""
    demo = [
        entry.key_name("sha256")
        for entry in config.section("auth").tables("keys")
        if entry.get_str("sha256", "").lower() == DEMO_KEY_DIGEST
    ]
    if demo and not tls.is_loopback(host):
        raise ConfigError(
            f"{demo[0]}: the public demo key cm-demo-admin-key is configured but the server "
            f"listens on {host}; set your own keys ([[auth.keys]] or COSTMESH_API_KEYS)"
        )


def _check_server(config: Config) -> tuple[str, int]:
    """The configured listen host and port, after checking every server.* value."""
    server = config.section("server")
    port = server.get_int("port", minimum=0)
    for name, value in (("port", port), ("http_port", server.get_int("http_port", 0, minimum=0))):
        if value > 65535:
            raise ConfigError(f"server.{name}: must be at most 65535, got {value}")
    if server.get_float("grace_seconds") < 0:
        raise ConfigError("server.grace_seconds: must not be negative")
    timeout = config.section("peers").get_float("timeout_seconds", 5.0)
    if timeout <= 0:
        raise ConfigError(f"peers.timeout_seconds: must be positive, got {timeout}")
    return server.get_str("host"), port


def _build_services(
    config: Config,
    env: Mapping[str, str],
    names: Sequence[str],
    *,
    channels: Channels,
    tracer_provider: TracerProvider,
    stand_ins: Mapping[str, str],
) -> Callable[[str], Awaitable[list[ServiceDef]]]:
    """What create_server calls once it knows where the services reach each other."""

    def build_one(name: str, local: str) -> ServiceDef:
        if name == "cache":
            return cache_service.build(config, env, tracer_provider)
        if name == "router":
            return router_service.build(config, env, tracer_provider, stand_ins=stand_ins)
        if name == "ledger":
            return ledger_service.build(config)
        return inference_service.build(
            config,
            env,
            channels,
            _peer_addresses(config, names, local),
            tracer_provider,
            stand_ins=stand_ins,
        )

    async def build(local: str) -> list[ServiceDef]:
        built: list[ServiceDef] = []
        try:
            for name in (n for n in SERVICES if n in names):
                built.append(build_one(name, local))
        except BaseException:
            for service in reversed(built):  # a later one failed: close what is open
                await service.stop()
            raise
        return built

    return build


async def start_mesh(
    config: Config,
    env: Mapping[str, str],
    names: Sequence[str],
    tracer_provider: TracerProvider,
    port: int | None = None,
    *,
    http_port: int | None = None,
    metering: Metering | None = None,
) -> RunningServer:
    """Start the named services in one gRPC server; port None means server.port.
    With `http_port` (0 picks a free port) an HTTP server too: `metering`'s /metrics,
    and the OpenAI-compatible API where inference runs. `costmesh serve` opens it on
    server.http_port; embedded meshes (evaluations, replays, tests) open none."""
    unknown = [n for n in names if n not in SERVICES]
    if unknown or not names:
        raise ConfigError(f"services: expected some of {', '.join(SERVICES)}, got {list(names)}")
    check_keys(config)
    host, configured_port = _check_server(config)
    _refuse_demo_key_off_loopback(config, host)
    own_tls = tls.server_tls(config)
    tls.check_plaintext(config, host, own_tls)
    service_key = _service_key(config, env, names)
    keys = KeyTable.from_config(config.section("auth"), service_key)
    interceptors = [*telemetry.server_interceptors(tracer_provider), EdgeInterceptor(keys)]
    # Peers in this process are called directly: the in-process server makes its own
    # server spans, so it takes only the edge (authentication and error statuses).
    hops = "inference" in names and any(p in names for p in PEERS)
    chat_door = "inference" in names and http_port is not None
    local = InProcessServer([EdgeInterceptor(keys)], tracer_provider) if hops or chat_door else None
    channels = Channels(
        service_key,
        tracer_provider,
        config.section("peers").get_float("timeout_seconds", 5.0),
        local,
        tls.peer_tls(config),
    )
    # The simulator is for the one-process demo only: a split deployment that lost
    # its key must fail loudly, not answer placeholders.
    one_process = set(names) == set(SERVICES)
    stand_ins = start_stand_ins(config, env) if one_process else StandIns()
    try:
        running = await create_server(
            host,
            configured_port if port is None else port,
            _build_services(
                config,
                env,
                names,
                channels=channels,
                tracer_provider=tracer_provider,
                stand_ins=stand_ins.base_urls,
            ),
            interceptors,
            local=local,
            tls=own_tls,
        )
    except BaseException:
        await channels.close()
        stand_ins.stop()
        raise
    running.cleanups.append(channels.close)
    running.cleanups.append(_stopper(stand_ins))
    if http_port is not None:
        try:
            await _open_front_door(
                running,
                config,
                keys=keys,
                local=local,
                chat=chat_door,
                host=host,
                port=http_port,
                tracer_provider=tracer_provider,
                metering=metering,
                own_tls=own_tls,
            )
        except BaseException:
            await running.stop(grace=0)
            raise
    return running


async def _open_front_door(
    running: RunningServer,
    config: Config,
    *,
    keys: KeyTable,
    local: InProcessServer | None,
    chat: bool,
    host: str,
    port: int,
    tracer_provider: TracerProvider,
    metering: Metering | None,
    own_tls: tls.ServerTls | None,
) -> None:
    """The OpenAI-compatible door where inference runs, /metrics in every process."""
    door = FrontDoor(
        local.channel() if chat and local is not None else None,
        config.section("models").names(),
        keys.lookup,
        tracer_provider.get_tracer("costmesh.front_door"),
        metrics=metering.exposition if metering else None,
    )
    grace = config.section("server").get_float("grace_seconds")
    http = await start_http(door.app, host, port, grace, own_tls)
    running.doors.append(http.stop)
    running.http_port = http.port


def _stopper(stand_ins: StandIns) -> Callable[[], Awaitable[None]]:
    async def stop() -> None:
        stand_ins.stop()

    return stop
