"""compose.yaml and the Dockerfile checked against the code they run.

No container engine is needed: the files are parsed and every name, command, address,
port and health check in them is compared with what the code really reads, parses,
listens on and registers. The health-check commands are also run against a real server.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.sdk import environment_variables as otel_env

import costmesh_tools.cli
from costmesh_tools.certs import make_dev_set
from costmesh_tools.cli import _parser
from services import SERVICES
from services.cache import service as cache_service
from services.common import metrics, telemetry, tls
from services.common.config import API_KEYS_ENV, CONFIG_ENV, ENV_OVERRIDES, ConfigError, load_config
from services.inference import service as inference_service
from services.ledger import service as ledger_service
from services.mesh import PEERS, _peer_addresses, _service_key
from services.router import service as router_service

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
CERTS_DIR = "/etc/costmesh/certs"  # the certs volume, where compose mounts it

# The gRPC service each costmesh service registers (and marks SERVING in gRPC health).
GRPC_SERVICE: dict[str, str] = {
    "cache": cache_service.SERVICE_NAME,
    "router": router_service.SERVICE_NAME,
    "ledger": ledger_service.SERVICE_NAME,
    "inference": inference_service.SERVICE_NAME,
}
HOST_ENV = {
    "COSTMESH_SERVICE_KEY": "test-shared-service-key",
    "OPENAI_API_KEY": "sk-test",
    "COSTMESH_API_KEYS": "ops:admin:" + "a" * 64,
}
_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
_HEALTH_SERVICE = re.compile(r"HealthCheckRequest\(service='(?P<name>[^']*)'")
_HEALTH_ADDRESS = re.compile(r"secure_channel\('(?P<host>[^':]+):(?P<port>\d+)', c\)")


# --- reading the files ----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "compose.yaml is not a mapping"
    return data


@pytest.fixture(scope="module")
def costmesh(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose services built from this repository's Dockerfile."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def _environment(svc: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as written (both the mapping and the KEY=VALUE list form)."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _interpolate(value: str, host: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg") or ""
        present = name in host and (host[name] != "" or not (op or "").startswith(":"))
        if present:
            return host[name]
        if op in {":?", "?"}:
            raise LookupError(f"{name}: {arg}")
        return arg if op in {":-", "-"} else ""

    return _INTERPOLATION.sub(replace, value)


def _resolved_environment(svc: Mapping[str, Any], host: Mapping[str, str]) -> dict[str, str]:
    return {k: _interpolate(v, host) for k, v in _environment(svc).items()}


def _serve_args(svc: Mapping[str, Any]) -> Any:
    command = svc["command"]
    assert isinstance(command, list), f"command must be an exec-form list, got {command!r}"
    argv = [str(a) for a in command]
    return _parser(argv).parse_args(argv)


def _listen_port(svc: Mapping[str, Any]) -> int:
    """The port the service listens on: --port, else COSTMESH_PORT, else the default."""
    args = _serve_args(svc)
    if args.port is not None:
        return int(args.port)
    config = load_config(env=_resolved_environment(svc, HOST_ENV))
    return config.section("server").get_int("port")


def _mounts(svc: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (volume name or host path, subpath), short and long syntax."""
    mounts = {}
    for volume in svc.get("volumes", []):
        if isinstance(volume, dict):
            subpath = (volume.get("volume") or {}).get("subpath", "")
            mounts[volume["target"]] = (volume["source"], subpath)
        else:
            source, target = str(volume).split(":")[:2]
            mounts[target] = (source, "")
    return mounts


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert duration, "empty duration"
    assert match, f"unsupported duration {duration!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _docker_args(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    values = [rest for kw, rest in instructions if kw == keyword]
    assert values, f"Dockerfile has no {keyword}"
    parsed = json.loads(values[-1])  # the last one wins; the exec (JSON) form is required
    assert isinstance(parsed, list)
    assert all(isinstance(a, str) for a in parsed)
    return parsed


def _dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in instructions:
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, sep, value = item.partition("=")
                assert sep, f"use ENV NAME=value, got {item!r}"
                env[name] = value
    return env


def _known_variables() -> set[str]:
    """Every environment variable some part of the code reads."""
    config = load_config(env={})
    providers = config.section("providers")
    known = {*ENV_OVERRIDES, CONFIG_ENV, API_KEYS_ENV}
    known.add(config.section("auth").get_str("service_key_env"))
    known |= {providers.section(name).get_str("api_key_env") for name in providers.names()}
    telemetry_source = inspect.getsource(telemetry) + inspect.getsource(metrics)
    known |= set(re.findall(r"\bOTEL_[A-Z_]*[A-Z]\b", telemetry_source))
    if "OTLPSpanExporter()" in telemetry_source:
        # Built without arguments, the OTLP exporter reads its own OTEL_EXPORTER_OTLP_* variables.
        known |= {n for n in dir(otel_env) if n.startswith("OTEL_EXPORTER_OTLP_")}
    assert "COSTMESH_LOG_LEVEL" in inspect.getsource(costmesh_tools.cli)
    known.add("COSTMESH_LOG_LEVEL")
    return known


# --- the mesh services ----------------------------------------------------------------


def test_compose_runs_each_mesh_service_from_this_repository(
    costmesh: dict[str, dict[str, Any]],
) -> None:
    assert set(costmesh) == set(SERVICES)
    for name, svc in costmesh.items():
        build = svc["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert (ROOT / context / dockerfile).resolve() == DOCKERFILE, name


def test_costmesh_services_set_only_variables_the_code_reads(
    costmesh: dict[str, dict[str, Any]],
) -> None:
    known = _known_variables()
    unread = {name: sorted(set(_environment(svc)) - known) for name, svc in costmesh.items()}
    assert unread == {name: [] for name in costmesh}, "variables no code reads"
    dockerfile_env = {n for n in _dockerfile_env(_dockerfile()) if n.startswith("COSTMESH_")}
    assert dockerfile_env <= known


def test_the_variable_check_catches_a_misspelt_name() -> None:
    known = _known_variables()
    assert {"COSTMESH_HOST", "CACHE_ADDR", "COSTMESH_SERVICE_KEY", "OPENAI_API_KEY"} <= known
    assert {"OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT", "COSTMESH_LOG_LEVEL"} <= known
    assert {"COSTMESH_HOSTNAME", "REDIS_URL", "DATABASE_URL"}.isdisjoint(known)


def test_costmesh_services_listen_on_every_interface_and_name_their_traces(
    costmesh: dict[str, dict[str, Any]],
) -> None:
    for name, svc in costmesh.items():
        config = load_config(env=_resolved_environment(svc, HOST_ENV))
        assert config.section("server").get_str("host") == "0.0.0.0", name
        assert _environment(svc).get("OTEL_SERVICE_NAME") == f"costmesh-{name}"


def test_every_command_parses_with_the_cli_and_names_its_service(
    costmesh: dict[str, dict[str, Any]],
) -> None:
    for name, svc in costmesh.items():
        args = _serve_args(svc)
        assert (args.command, args.service) == ("serve", name)
        assert args.service in SERVICES
        assert 0 < _listen_port(svc) < 65536


def test_each_service_environment_is_a_working_configuration_for_it_alone(
    costmesh: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    make_dev_set(tmp_path)  # what the certs service writes to the volume
    for name, svc in costmesh.items():
        env = {
            k: v.replace(CERTS_DIR, str(tmp_path))
            for k, v in _resolved_environment(svc, HOST_ENV).items()
        }
        config = load_config(env=env)
        # Run as separate processes, every service needs the shared key...
        assert _service_key(config, env, [name]) == HOST_ENV["COSTMESH_SERVICE_KEY"]
        if name == "inference":
            # ...and inference needs an address for every peer (ConfigError otherwise).
            addresses = _peer_addresses(config, [name], f"127.0.0.1:{_listen_port(svc)}")
            assert set(addresses) == set(PEERS)


def test_every_service_gets_the_same_service_key(costmesh: dict[str, dict[str, Any]]) -> None:
    key_env = load_config(env={}).section("auth").get_str("service_key_env")
    written = {name: _environment(svc).get(key_env) for name, svc in costmesh.items()}
    assert None not in written.values(), f"{key_env} missing: {written}"
    assert len(set(written.values())) == 1, f"{key_env} differs between services: {written}"
    resolved = {
        name: _resolved_environment(svc, HOST_ENV)[key_env] for name, svc in costmesh.items()
    }
    assert set(resolved.values()) == {HOST_ENV[key_env]}
    try:  # unset on the host: refused (${VAR:?...}) or one non-empty documented default
        defaults = {_resolved_environment(svc, {})[key_env] for svc in costmesh.values()}
    except LookupError:
        return
    assert len(defaults) == 1
    assert "" not in defaults


def test_peer_addresses_point_at_services_listening_there(
    compose: dict[str, Any], costmesh: dict[str, dict[str, Any]]
) -> None:
    peer_vars = {
        v: k.removeprefix("peers.")
        for v, k in ENV_OVERRIDES.items()
        if k.removeprefix("peers.") in PEERS
    }
    assert set(peer_vars.values()) == set(PEERS)
    checked = 0
    for name, svc in costmesh.items():
        env = _resolved_environment(svc, HOST_ENV)
        for var, peer in peer_vars.items():
            if var not in env:
                continue
            host, _, port = env[var].rpartition(":")
            assert host in compose["services"], f"{name}: {var}={env[var]} names no service"
            target = compose["services"][host]
            assert _serve_args(target).service in (peer, "all"), f"{name}: {var} is not {peer}"
            assert int(port) == _listen_port(target), f"{name}: {var} port"
            checked += 1
    assert checked >= len(PEERS)


def test_inference_waits_for_healthy_peers(
    compose: dict[str, Any], costmesh: dict[str, dict[str, Any]]
) -> None:
    inference = costmesh["inference"]
    depends = inference["depends_on"]
    assert isinstance(depends, dict), "use the long form of depends_on, with conditions"
    env = _environment(inference)
    for var, key in ENV_OVERRIDES.items():
        if key.removeprefix("peers.") in PEERS and var in env:
            host = env[var].rpartition(":")[0]
            assert depends[host]["condition"] == "service_healthy", host
            assert "healthcheck" in compose["services"][host], host


def test_every_healthcheck_asks_grpc_health_for_the_service_it_runs(
    costmesh: dict[str, dict[str, Any]],
) -> None:
    for name, svc in costmesh.items():
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], f"{name}: {test[:3]}"
        code = test[3]
        compile(code, f"<{name} healthcheck>", "exec")
        assert "grpc_health.v1" in code
        assert "HealthCheckResponse.SERVING" in code
        service = _HEALTH_SERVICE.search(code)
        address = _HEALTH_ADDRESS.search(code)
        assert service, f"{name}: the health check names no service"
        assert address, f"{name}: the health check names no address"
        assert service["name"] == GRPC_SERVICE[_serve_args(svc).service]
        assert address["host"] == "localhost"  # a name the service's certificate holds
        assert int(address["port"]) == _listen_port(svc)


def _tls_env(certs: Path, service: str) -> dict[str, str]:
    """The TLS variables compose sets for `service`, pointing at `certs`."""
    return {
        "COSTMESH_TLS_CERT_FILE": str(certs / f"{service}.pem"),
        "COSTMESH_TLS_KEY_FILE": str(certs / f"{service}-key.pem"),
        "COSTMESH_TLS_CLIENT_CA_FILE": str(certs / "ca.pem"),
    }


@pytest.fixture
def running_mesh(tmp_path: Path) -> Iterator[int]:
    """`costmesh serve all` with mutual TLS on a free port, configured only by
    tmp_path (certificates in tmp_path/certs); yields the port."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COSTMESH_", "OTEL_", "OPENAI_")) and k not in ENV_OVERRIDES
    }
    env["COSTMESH_DATA_DIR"] = str(tmp_path / "data")
    make_dev_set(tmp_path / "certs")
    env |= _tls_env(tmp_path / "certs", "inference")
    log = tmp_path / "stderr.log"
    with (
        log.open("w") as stderr,
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "costmesh_tools.cli",
                "serve",
                "all",
                "--port",
                "0",
                "--http-port",
                "0",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline()
            match = re.fullmatch(r"costmesh: serving all on [\d.]+:(\d+)\n", ready)
            assert match, f"no ready line: {ready!r}; {log.read_text()}"
            yield int(match.group(1))
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_healthchecks_pass_against_a_serving_server_and_fail_for_an_unknown_service(
    costmesh: dict[str, dict[str, Any]], running_mesh: int, tmp_path: Path
) -> None:
    def run(code: str, service: str) -> int:
        env = {**os.environ, **_tls_env(tmp_path / "certs", service)}
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=30, check=False, env=env
        ).returncode

    for name, svc in costmesh.items():
        code = svc["healthcheck"]["test"][3].replace(
            f"localhost:{_listen_port(svc)}", f"localhost:{running_mesh}"
        )
        assert run(code, name) == 0, f"{name} healthcheck failed against a serving mesh"
    code = costmesh["cache"]["healthcheck"]["test"][3]
    unknown = code.replace(GRPC_SERVICE["cache"], "costmesh.nothing.v1.NoService").replace(
        f"localhost:{_listen_port(costmesh['cache'])}", f"localhost:{running_mesh}"
    )
    assert run(unknown, "cache") != 0


def test_every_port_speaks_mutual_tls_with_certificates_from_the_certs_volume(
    compose: dict[str, Any], costmesh: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    certs = compose["services"]["certs"]
    argv = [str(a) for a in certs["command"]]
    args = _parser(argv).parse_args(argv)
    assert (args.command, args.certs_command, args.keep) == ("certs", "dev", True)
    make_dev_set(tmp_path)
    for name, svc in costmesh.items():
        env = _resolved_environment(svc, HOST_ENV)
        # Only its own folder of the volume: the CA's certificate and its own pair.
        assert _mounts(svc)[str(args.out)] == ("certs", name), name
        assert svc["depends_on"]["certs"]["condition"] == "service_completed_successfully"
        files = [env[f"COSTMESH_TLS_{k}_FILE"] for k in ("CERT", "KEY", "CLIENT_CA")]
        if name == "inference":
            files += [env[f"COSTMESH_PEERS_TLS_{k}_FILE"] for k in ("CA", "CERT", "KEY")]
        for file in files:
            folder, _, base = file.rpartition("/")
            assert folder == str(args.out), f"{name}: {file}"
            assert (tmp_path / name / base).is_file(), f"{name}: {base} is not in its folder"
        assert env["COSTMESH_TLS_CERT_FILE"].endswith(f"/{name}.pem")
        # A working configuration for the service: the checks pass on the real files.
        local = {k: v.replace(str(args.out), str(tmp_path / name)) for k, v in env.items()}
        assert tls.server_tls(load_config(env=local)) is not None
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    tls_config = scrape["scrape_configs"][0]["tls_config"]
    assert scrape["scrape_configs"][0]["scheme"] == "https"
    prometheus = compose["services"]["prometheus"]
    assert _mounts(prometheus)[str(args.out)] == ("certs", "client")
    assert all((tmp_path / "client" / Path(f).name).is_file() for f in tls_config.values())
    assert not (tmp_path / "client" / "ca-key.pem").exists(), "no container gets the CA's key"


def test_stop_grace_outlasts_the_shutdown_grace(costmesh: dict[str, dict[str, Any]]) -> None:
    for name, svc in costmesh.items():
        grace = load_config(env=_resolved_environment(svc, HOST_ENV)).section("server")
        assert _seconds(svc["stop_grace_period"]) > grace.get_float("grace_seconds"), name


def test_data_directories_are_named_volumes(
    compose: dict[str, Any], costmesh: dict[str, dict[str, Any]]
) -> None:
    assert "COSTMESH_DATA_DIR" in _environment(costmesh["ledger"])
    for name, svc in costmesh.items():
        data_dir = _environment(svc).get("COSTMESH_DATA_DIR")
        if data_dir is None:
            continue
        mounts = _mounts(svc)
        assert data_dir in mounts, f"{name}: {data_dir} is not a mounted volume"
        assert mounts[data_dir][0] in compose["volumes"], f"{name}: not a named volume"


def test_inference_is_published_on_its_listen_port(costmesh: dict[str, dict[str, Any]]) -> None:
    port = _listen_port(costmesh["inference"])
    assert f"127.0.0.1:{port}:{port}" in [str(p) for p in costmesh["inference"]["ports"]]
    # Required: separate processes never fall back to the simulator.
    assert _environment(costmesh["inference"])["OPENAI_API_KEY"].startswith("${OPENAI_API_KEY:?")


# --- the supporting services ----------------------------------------------------------


def test_traces_go_to_jaeger_over_otlp_grpc(
    compose: dict[str, Any], costmesh: dict[str, dict[str, Any]]
) -> None:
    jaeger = compose["services"]["jaeger"]
    assert str(jaeger["image"]).startswith("jaegertracing/all-in-one")
    assert _environment(jaeger)["COLLECTOR_OTLP_ENABLED"] == "true"
    published = {str(p).split(":")[-1] for p in jaeger["ports"]}
    assert {"16686", "4317"} <= published
    for name, svc in costmesh.items():
        endpoint = _environment(svc)["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert re.fullmatch(r"http://jaeger:4317", endpoint), f"{name}: {endpoint}"


def test_redis_and_postgres_run_with_real_readiness_checks(compose: dict[str, Any]) -> None:
    redis, postgres = compose["services"]["redis"], compose["services"]["postgres"]
    assert redis["image"] == "redis:7"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert postgres["image"] == "postgres:16"
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    env = _environment(postgres)
    assert env["POSTGRES_DB"] == "costmesh"
    assert _interpolate(env["POSTGRES_PASSWORD"], {})


# --- the image ------------------------------------------------------------------------


def test_dockerfile_installs_the_package_and_runs_its_console_script() -> None:
    instructions = _dockerfile()
    pyproject = tomllib.loads(PYPROJECT.read_text())
    assert [rest for kw, rest in instructions if kw == "FROM"] == ["python:3.11-slim"]
    copied = {
        src.rstrip("/")
        for kw, rest in instructions
        if kw == "COPY" and not rest.startswith("--from")
        for src in shlex.split(rest)[:-1]
    }
    assert {"pyproject.toml", pyproject["project"]["readme"], "protos", "services"} <= copied
    # Every package the install would find beside protos/ is in the image.
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, i) for i in include)
    }
    assert packages <= copied, f"packages left out of the image: {sorted(packages - copied)}"
    missing = sorted(src for src in copied if not (ROOT / src).exists())
    assert not missing, f"COPY names files the build context lacks: {missing}"
    assert any(
        re.search(r"\bpip install --no-cache-dir \.(\s|$)", rest)
        for kw, rest in instructions
        if kw == "RUN"
    )
    scripts = pyproject["project"]["scripts"]
    entrypoint = _docker_args(instructions, "ENTRYPOINT")
    assert len(entrypoint) == 1
    assert entrypoint[0] in scripts
    module, _, attr = scripts[entrypoint[0]].partition(":")
    assert getattr(import_module(module), attr) is costmesh_tools.cli.main
    command = _docker_args(instructions, "CMD")
    args = _parser(command).parse_args(command)
    assert args.command == "serve"
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    env = _dockerfile_env(instructions)
    assert env.get("COSTMESH_HOST") == "0.0.0.0"


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".venv", "node_modules", ".costmesh", ".git"} <= set(patterns)
    for kw, rest in _dockerfile():
        if kw != "COPY":
            continue
        for src in shlex.split(rest)[:-1]:
            name = src.rstrip("/")
            assert not any(fnmatch.fnmatch(name, p) for p in patterns), f"{name} is ignored"


def test_config_error_is_what_a_missing_peer_raises() -> None:
    # Guards the configuration test: with no CACHE_ADDR, inference alone must be refused.
    with pytest.raises(ConfigError, match=r"peers\.cache"):
        _peer_addresses(load_config(env={}), ["inference"], "127.0.0.1:50051")
