"""Configuration: defaults, file, environment; a bad value fails at start naming its key."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services import SERVICES
from services.common.config import ConfigError, load_config
from services.inference.settings import InferenceSettings
from services.mesh import start_mesh


def test_embedded_defaults_run_with_no_file_and_no_environment() -> None:
    config = load_config(env={})
    assert config.section("server").get_int("port") == 50051
    assert set(config.section("features").names()) >= {"default", "support"}


def test_file_overrides_defaults_and_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 6000\n[peers]\ncache = "cache:1"\n')

    from_file = load_config(path, env={})
    from_env = load_config(env={"COSTMESH_CONFIG": str(path), "COSTMESH_PORT": "7000"})

    assert from_file.section("server").get_int("port") == 6000
    assert from_file.section("server").get_str("host") == "127.0.0.1", (
        "untouched keys keep defaults"
    )
    assert from_file.section("peers").get_str("cache") == "cache:1"
    assert from_env.section("server").get_int("port") == 7000


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[server]\nport = 'x'\n", {}, r"server\.port: expected an integer"),
        ("", {"COSTMESH_PORT": "eighty"}, r"server\.port: expected an integer"),
        ("[features.support]\ntier = 'hard'\n", {}, r"features\.support\.tier: expected one of"),
        (
            "[features.support.models]\nsimple = 'gpt-5-imaginary'\n",
            {},
            r"features\.support\.models\.simple: unknown model",
        ),
        (
            "[[auth.keys]]\nteam = 'x'\nsha256 = 'abc'\n",
            {},
            r"auth\.keys\[0\]\.sha256: expected 64 hex",
        ),
        (
            "[[auth.keys]]\nteam = 'x'\nrole='boss'\nsha256 = '" + "a" * 64 + "'\n",
            {},
            r"auth\.keys\[0\]\.role: expected one of",
        ),
        ("[server\n", {}, "not valid TOML"),
        (
            "[features.support]\ncache_ttl_second = 5\n",
            {},
            r"features\.support\.cache_ttl_second: unknown key",
        ),
        ("[ledgr]\ndatabase = 'x'\n", {}, r"ledgr: unknown key"),
        ("[peers]\ntimeout_seconds = 0\n", {}, r"peers\.timeout_seconds: must be positive"),
        (
            "[features.support.models]\nsimple = ''\n",
            {},
            r"features\.support\.models\.simple: must name a model",
        ),
        (
            "[features.support.models]\nsimpel = 'gpt-4o'\n",
            {},
            r"features\.support\.models\.simpel: unknown key",
        ),
    ],
    ids=[
        "type",
        "env type",
        "tier",
        "model",
        "key digest",
        "role",
        "syntax",
        "typo",
        "section",
        "timeout",
        "empty model",
        "tier typo",
    ],
)
async def test_bad_configuration_fails_at_start_naming_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    env = {**env, "COSTMESH_DATA_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match=message):
        await start_mesh(load_config(path, env), env, SERVICES, TracerProvider(), port=0)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml", env={})


async def test_separate_processes_need_a_shared_service_key(tmp_path: Path) -> None:
    env = {"COSTMESH_DATA_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match="COSTMESH_SERVICE_KEY"):
        await start_mesh(load_config(env=env), env, ["ledger"], TracerProvider(), port=0)


def test_features_inherit_from_default_and_override_what_they_name(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[features.default]\nmax_tokens_limit = 1000\n"
        "[features.search]\ntier = 'complex'\n[features.search.models]\ncomplex = 'gpt-4o-mini'\n"
    )

    search = load_config(path, env={}).section("features").section("search")

    assert search.get_str("tier") == "complex"
    assert search.get_int("max_tokens_limit") == 1000, "inherited from default"
    assert search.get_int("cache_ttl_seconds") == 3600, "inherited from the embedded default"
    assert search.section("models").get_str("complex") == "gpt-4o-mini"
    assert search.section("models").get_str("simple") == "gpt-4o-mini", "models merge key by key"


async def test_the_public_demo_key_is_refused_off_loopback(tmp_path: Path) -> None:
    env = {"COSTMESH_DATA_DIR": str(tmp_path), "COSTMESH_HOST": "0.0.0.0"}
    with pytest.raises(ConfigError, match=r"auth\.keys\[0\]\.sha256: the public demo key"):
        await start_mesh(load_config(env=env), env, SERVICES, TracerProvider(), port=0)


def test_api_keys_from_the_environment_replace_the_configured_ones() -> None:
    digest = "b" * 64
    keys = load_config(env={"COSTMESH_API_KEYS": f"ops:admin:{digest}, search::{'c' * 64}"})

    entries = keys.section("auth").tables("keys")

    assert [(e.get_str("team"), e.get_str("role"), e.get_str("sha256")) for e in entries] == [
        ("ops", "admin", digest),
        ("search", "member", "c" * 64),
    ]


def test_a_malformed_api_keys_variable_names_the_entry() -> None:
    with pytest.raises(ConfigError, match=r"COSTMESH_API_KEYS\[1\]: expected team:role:sha256"):
        load_config(env={"COSTMESH_API_KEYS": f"ops:admin:{'a' * 64},oops"})


async def test_a_start_that_fails_partway_leaves_the_port_and_files_free(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[providers.other]\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "OTHER_KEY"\n'
        "simulate_without_key = false\n"
    )
    env = {"COSTMESH_DATA_DIR": str(tmp_path)}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(ConfigError, match=r"providers\.other\.api_key_env: set OTHER_KEY"):
        await start_mesh(load_config(bad, env), env, SERVICES, TracerProvider(), port=port)
    running = await start_mesh(load_config(env=env), env, SERVICES, TracerProvider(), port=port)
    await running.stop(grace=0)

    assert running.port == port
    assert not [t for t in threading.enumerate() if t.name.startswith("openai-simulator")]


def test_a_feature_that_lowers_its_limit_gets_a_default_within_it(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[features.summaries]\nmax_tokens_limit = 256\n")

    settings = InferenceSettings.from_config(load_config(path, env={}))

    assert settings.features["summaries"].max_tokens_limit == 256
    assert settings.features["summaries"].max_tokens_default == 256
