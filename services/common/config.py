"""One TOML configuration for the whole mesh: embedded defaults, a file, then environment."""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

# Environment variables that override a configuration key, by dotted key. Kept as
# one explicit table so the README and compose.yaml can be checked against it.
ENV_OVERRIDES: dict[str, str] = {
    "COSTMESH_HOST": "server.host",
    "COSTMESH_PORT": "server.port",
    "COSTMESH_HTTP_PORT": "server.http_port",
    "COSTMESH_GRACE_SECONDS": "server.grace_seconds",
    "COSTMESH_DATA_DIR": "server.data_dir",
    "COSTMESH_INSECURE": "server.insecure",
    "COSTMESH_TLS_CERT_FILE": "server.tls.cert_file",
    "COSTMESH_TLS_KEY_FILE": "server.tls.key_file",
    "COSTMESH_TLS_CLIENT_CA_FILE": "server.tls.client_ca_file",
    "COSTMESH_PEERS_TLS_CA_FILE": "peers.tls.ca_file",
    "COSTMESH_PEERS_TLS_CERT_FILE": "peers.tls.cert_file",
    "COSTMESH_PEERS_TLS_KEY_FILE": "peers.tls.key_file",
    "CACHE_ADDR": "peers.cache",
    "ROUTER_ADDR": "peers.router",
    "LEDGER_ADDR": "peers.ledger",
    "LEDGER_DATABASE": "ledger.database",
    "OPENAI_BASE_URL": "providers.openai.base_url",
}
CONFIG_ENV = "COSTMESH_CONFIG"
# API keys for containers, replacing [[auth.keys]]: "team:role:sha256" entries
# separated by commas (the role may be left out: "team::sha256" is a member key).
API_KEYS_ENV = "COSTMESH_API_KEYS"


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key."""


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Merge the embedded defaults, the TOML file (if any) and environment overrides."""
    env = os.environ if env is None else env
    data = tomllib.loads(resources.files("services.common").joinpath("defaults.toml").read_text())
    file_path = path or env.get(CONFIG_ENV)
    if file_path:
        try:
            with Path(file_path).open("rb") as fh:
                _deep_merge(data, tomllib.load(fh))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file_path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file_path} is not valid TOML: {exc}") from exc
    for var, dotted in ENV_OVERRIDES.items():
        if var in env:
            _set_dotted(data, dotted, env[var])
    if env.get(API_KEYS_ENV):
        data.setdefault("auth", {})["keys"] = _parse_api_keys(env[API_KEYS_ENV])
    _inherit_feature_defaults(data)
    return Config(data)


def _inherit_feature_defaults(data: dict[str, Any]) -> None:
    """Every [features.X] starts from [features.default] and overrides what it names."""
    features = data.get("features")
    if not isinstance(features, dict) or not isinstance(features.get("default"), dict):
        return
    for name, table in features.items():
        if name != "default" and isinstance(table, dict):
            merged = copy.deepcopy(features["default"])
            _deep_merge(merged, table)
            features[name] = merged


class Config:
    """Typed, key-naming access to the merged configuration tree."""

    def __init__(self, data: dict[str, Any], prefix: str = "") -> None:
        self._data = data
        self._prefix = prefix

    def key_name(self, key: str) -> str:
        """The dotted name of `key` in this table, for error messages."""
        return f"{self._prefix}{key}"

    def section(self, key: str) -> Config:
        """A sub-table; an absent one reads as empty so its keys fall back to defaults."""
        value = self._data.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.key_name(key)}: expected a table")
        return Config(value, f"{self.key_name(key)}.")

    def names(self) -> list[str]:
        return list(self._data)

    def get_str(self, key: str, default: str | None = None) -> str:
        value = self._data.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.key_name(key)}: expected a string, got {value!r}")
        return value

    def get_int(self, key: str, default: int | None = None, minimum: int | None = None) -> int:
        value = self._data.get(key, default)
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(
                    f"{self.key_name(key)}: expected an integer, got {value!r}"
                ) from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self.key_name(key)}: expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.key_name(key)}: must be at least {minimum}, got {value}")
        return value

    def get_float(self, key: str, default: float | None = None) -> float:
        value = self._data.get(key, default)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(
                    f"{self.key_name(key)}: expected a number, got {value!r}"
                ) from None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{self.key_name(key)}: expected a number, got {value!r}")
        return float(value)

    def get_bool(self, key: str, default: bool | None = None) -> bool:
        value = self._data.get(key, default)
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0"}:
            value = value.lower() in {"true", "1"}
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key_name(key)}: expected true or false, got {value!r}")
        return value

    def get_choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.get_str(key, default)
        if value not in choices:
            raise ConfigError(
                f"{self.key_name(key)}: expected one of {', '.join(choices)}, got {value!r}"
            )
        return value

    def get_list(self, key: str, default: list[str] | None = None) -> list[str]:
        """An array of strings, such as a model's fallbacks."""
        value = self._data.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key_name(key)}: expected an array of strings, got {value!r}")
        return list(value)

    def tables(self, key: str) -> list[Config]:
        """An array of tables, such as [[auth.keys]]."""
        value = self._data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{self.key_name(key)}: expected an array of tables")
        return [Config(v, f"{self.key_name(key)}[{i}].") for i, v in enumerate(value)]

    def reject_unknown(self, allowed: set[str]) -> None:
        """Fail on misspelt keys instead of silently ignoring them."""
        for key in self._data:
            if key not in allowed:
                raise ConfigError(
                    f"{self.key_name(key)}: unknown key (expected one of {sorted(allowed)})"
                )


def _parse_api_keys(value: str) -> list[dict[str, str]]:
    keys = []
    for index, entry in enumerate(e.strip() for e in value.split(",") if e.strip()):
        parts = entry.split(":")
        if len(parts) != 3:
            raise ConfigError(f"{API_KEYS_ENV}[{index}]: expected team:role:sha256, got {entry!r}")
        team, role, digest = parts
        keys.append({"team": team, "role": role or "member", "sha256": digest})
    return keys


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def _set_dotted(data: dict[str, Any], dotted: str, value: str) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value
