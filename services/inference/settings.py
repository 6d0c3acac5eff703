"""Inference settings read from the mesh configuration, checked at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import Config, ConfigError
from services.inference.budgets import TeamLimits
from services.inference.experiments import FeatureExperiment
from services.providers.resilience import RetryPolicy
from services.providers.settings import ModelInfo, ProviderInfo, ProviderSettings


@dataclass(frozen=True)
class FeatureLimits:
    """Token budget of one feature: what a caller may ask for, and the prompt cap."""

    max_tokens_default: int
    max_tokens_limit: int
    max_input_tokens: int
    # The model the feature would use without routing, for the ledger's savings.
    baseline_model: str = ""
    # "off" skips the cache entirely; "exact" and "semantic" are the cache's business.
    cache_mode: str = "semantic"
    # What the cache embeds ("last_user" is also what the router classifies).
    cache_question: str = "last_user"
    # When the team is over budget: "refuse" (RESOURCE_EXHAUSTED) or "downgrade" to
    # the cheapest tier's model.
    over_budget: str = "refuse"
    cheapest_model: str = ""
    # A standing experiment: the share of requests run on the baseline policy.
    experiment: FeatureExperiment = field(default_factory=FeatureExperiment)


@dataclass(frozen=True)
class InferenceSettings:
    features: dict[str, FeatureLimits]
    calls: ProviderSettings
    outbox_path: Path
    outbox_retry_seconds: float
    idempotency_ttl_seconds: int
    batch_store_path: Path = Path("batches.sqlite3")
    batch_poll_seconds: float = 30.0
    teams: dict[str, TeamLimits] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, ModelInfo]:
        return self.calls.models

    @property
    def providers(self) -> dict[str, ProviderInfo]:
        return self.calls.providers

    @property
    def provider_timeout_seconds(self) -> float:
        return self.calls.provider_timeout_seconds

    @property
    def retry(self) -> RetryPolicy:
        return self.calls.retry

    @classmethod
    def from_config(cls, config: Config) -> InferenceSettings:
        features = config.section("features")
        limits = {}
        for name in features.names():
            f = features.section(name)
            limit = f.get_int("max_tokens_limit", 4096, minimum=1)
            # Capped rather than refused: a feature that only lowers its limit must
            # not trip over the default it inherited.
            default = min(f.get_int("max_tokens_default", 512, minimum=1), limit)
            limits[name] = FeatureLimits(
                default,
                limit,
                f.get_int("max_input_tokens", 16000, minimum=1),
                f.get_str("baseline_model", f.section("models").get_str("complex", "")),
                f.get_choice("cache_mode", ("semantic", "exact", "off"), "semantic"),
                f.get_choice("cache_question", ("last_user", "all_user"), "last_user"),
                f.get_choice("over_budget", ("refuse", "downgrade"), "refuse"),
                f.section("models").get_str("simple", ""),
                FeatureExperiment.from_config(f),
            )
        calls = ProviderSettings.from_config(config)
        models = calls.models
        for name, feature in limits.items():
            if feature.experiment.name and not feature.baseline_model:
                raise ConfigError(
                    f"features.{name}.baseline_model: required by the feature's experiment "
                    "(its control arm runs the baseline model)"
                )
            if feature.baseline_model and feature.baseline_model not in models:
                raise ConfigError(
                    f"features.{name}.baseline_model: unknown model {feature.baseline_model!r}"
                )
        inference = config.section("inference")
        for key in ("batch_poll_seconds", "outbox_retry_seconds"):
            if key in inference.names() and not inference.get_float(key) > 0:
                raise ConfigError(f"inference.{key}: must be positive")
        data_dir = Path(config.section("server").get_str("data_dir"))
        return cls(
            features=limits,
            calls=calls,
            outbox_path=data_dir / inference.get_str("outbox", "outbox.sqlite3"),
            outbox_retry_seconds=inference.get_float("outbox_retry_seconds", 2.0),
            idempotency_ttl_seconds=inference.get_int("idempotency_ttl_seconds", 86_400, minimum=1),
            batch_store_path=data_dir / inference.get_str("batch_store", "batches.sqlite3"),
            batch_poll_seconds=inference.get_float("batch_poll_seconds", 30.0),
            teams=TeamLimits.from_config(config.section("teams")),
        )


def _check_positive(inference: Config) -> None:
    """Timings of zero would spin: every try timing out, a poller in a tight loop."""
    for key in (
        "provider_timeout_seconds", "attempt_timeout_seconds", "retry_base_seconds",
        "retry_max_seconds", "cooldown_seconds", "batch_poll_seconds", "outbox_retry_seconds",
    ):  # fmt: skip
        if key in inference.names() and not inference.get_float(key) > 0:
            raise ConfigError(f"inference.{key}: must be positive")
