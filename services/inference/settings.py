"""Inference settings read from the mesh configuration, checked at start."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import Config, ConfigError
from services.inference.budgets import TeamLimits
from services.inference.experiments import FeatureExperiment
from services.inference.resilience import RetryPolicy
from services.inference.simulator_knowledge import TIERS, Knowledge, KnowledgeError


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
class ModelInfo:
    provider: str
    context_window: int
    # Who answers when this deployment keeps failing: another deployment of the
    # same model, or a cheaper model, in order.
    fallbacks: tuple[str, ...] = ()
    tier: str = ""


@dataclass(frozen=True)
class ProviderInfo:
    base_url: str
    api_key_env: str
    simulate_without_key: bool


@dataclass(frozen=True)
class SimulatorSettings:
    """The local simulator that answers for a provider without a key (costmesh serve):
    instant placeholders, or realistic answers, latencies and quality (still labelled)."""

    realistic: bool = False
    latency_scale: float = 1.0
    knowledge: Knowledge | None = None
    seed: int = 0
    # Each model's tier: how well the realistic simulator lets it answer.
    model_tiers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config, models: dict[str, ModelInfo]) -> SimulatorSettings:
        section = config.section("simulator")
        realistic = section.get_bool("realistic", False)
        scale = section.get_float("latency_scale", 1.0)
        if not (math.isfinite(scale) and scale >= 0):
            raise ConfigError(f"simulator.latency_scale: must be a number >= 0, got {scale}")
        path = section.get_str("knowledge", "")
        if path and not realistic:
            raise ConfigError("simulator.knowledge: only read when simulator.realistic = true")
        try:
            knowledge = Knowledge.load(path) if path else None
        except KnowledgeError as exc:
            raise ConfigError(f"simulator.knowledge: {exc}") from None
        seed = section.get_int("seed", 0)
        return cls(realistic, scale, knowledge, seed, _model_tiers(config, models))

    def describe(self) -> str:
        """What the simulator's answers are, for the log line that says it stands in."""
        if not self.realistic:
            return "answers are placeholders, not model output"
        known = "no knowledge file"
        if self.knowledge is not None:
            known = f"{len(self.knowledge)} questions of {self.knowledge.source}"
        return (
            f"answers, token counts and latencies are realistic but SIMULATED ({known}; "
            f"latency x{self.latency_scale:g}; seed {self.seed}), not model output"
        )


def _model_tiers(config: Config, models: dict[str, ModelInfo]) -> dict[str, str]:
    """A model's configured tier, else the highest tier a feature uses it for (an
    escalation model counts as complex)."""
    tiers: dict[str, str] = {}
    features = config.section("features")
    for name in features.names():
        feature = features.section(name)
        table = feature.section("models")
        for tier in TIERS:
            model = table.get_str(tier, "")
            if model and TIERS.index(tier) >= TIERS.index(tiers.get(model, tier)):
                tiers[model] = tier
        escalation = feature.get_str("escalation_model", "")
        if escalation:
            tiers[escalation] = "complex"
    tiers.update({name: info.tier for name, info in models.items() if info.tier})
    return tiers


@dataclass(frozen=True)
class InferenceSettings:
    features: dict[str, FeatureLimits]
    models: dict[str, ModelInfo]
    providers: dict[str, ProviderInfo]
    outbox_path: Path
    outbox_retry_seconds: float
    provider_timeout_seconds: float
    idempotency_path: Path
    idempotency_ttl_seconds: int
    batch_store_path: Path = Path("batches.sqlite3")
    batch_poll_seconds: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    attempt_timeout_seconds: float = 30.0
    cooldown_failures: int = 5
    cooldown_seconds: float = 30.0
    teams: dict[str, TeamLimits] = field(default_factory=dict)
    simulator: SimulatorSettings = field(default_factory=SimulatorSettings)

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
        providers_cfg = config.section("providers")
        providers = {
            name: ProviderInfo(
                base_url=p.get_str("base_url"),
                api_key_env=p.get_str("api_key_env"),
                simulate_without_key=p.get_bool("simulate_without_key", False),
            )
            for name in providers_cfg.names()
            for p in [providers_cfg.section(name)]
        }
        models = _models(config.section("models"), set(providers))
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
        for key in (
            "provider_timeout_seconds",
            "attempt_timeout_seconds",
            "retry_base_seconds",
            "retry_max_seconds",
            "cooldown_seconds",
            "batch_poll_seconds",
            "outbox_retry_seconds",
        ):
            if key in inference.names() and not inference.get_float(key) > 0:
                raise ConfigError(f"inference.{key}: must be positive")
        data_dir = Path(config.section("server").get_str("data_dir"))
        return cls(
            features=limits,
            models=models,
            providers=providers,
            outbox_path=data_dir / inference.get_str("outbox", "outbox.sqlite3"),
            outbox_retry_seconds=inference.get_float("outbox_retry_seconds", 2.0),
            provider_timeout_seconds=inference.get_float("provider_timeout_seconds", 60.0),
            idempotency_path=data_dir / inference.get_str("idempotency", "idempotency.sqlite3"),
            idempotency_ttl_seconds=inference.get_int("idempotency_ttl_seconds", 86_400, minimum=1),
            batch_store_path=data_dir / inference.get_str("batch_store", "batches.sqlite3"),
            batch_poll_seconds=inference.get_float("batch_poll_seconds", 30.0),
            retry=RetryPolicy(
                inference.get_int("max_attempts", 3, minimum=1),
                inference.get_float("retry_base_seconds", 0.25),
                inference.get_float("retry_max_seconds", 8.0),
            ),
            attempt_timeout_seconds=inference.get_float("attempt_timeout_seconds", 30.0),
            cooldown_failures=inference.get_int("cooldown_failures", 5, minimum=1),
            cooldown_seconds=inference.get_float("cooldown_seconds", 30.0),
            teams=TeamLimits.from_config(config.section("teams")),
            simulator=SimulatorSettings.from_config(config, models),
        )


def _check_positive(inference: Config) -> None:
    """Timings of zero would spin: every try timing out, a poller in a tight loop."""
    for key in (
        "provider_timeout_seconds", "attempt_timeout_seconds", "retry_base_seconds",
        "retry_max_seconds", "cooldown_seconds", "batch_poll_seconds", "outbox_retry_seconds",
    ):  # fmt: skip
        if key in inference.names() and not inference.get_float(key) > 0:
            raise ConfigError(f"inference.{key}: must be positive")


def _models(models_cfg: Config, providers: set[str]) -> dict[str, ModelInfo]:
    """The model registry; every fallback must be a configured model."""
    models = {}
    for name in models_cfg.names():
        m = models_cfg.section(name)
        provider = m.get_str("provider")
        if provider not in providers:
            raise ConfigError(f"models.{name}.provider: unknown provider {provider!r}")
        fallbacks = m.get_list("fallbacks", [])
        if name in fallbacks:
            raise ConfigError(f"models.{name}.fallbacks: a model cannot fall back to itself")
        tier = m.get_choice("tier", ("", "simple", "moderate", "complex"), "")
        models[name] = ModelInfo(
            provider, m.get_int("context_window", minimum=1), tuple(fallbacks), tier
        )
    for name, info in models.items():
        for fallback in info.fallbacks:
            if fallback not in models:
                raise ConfigError(f"models.{name}.fallbacks: unknown model {fallback!r}")
    return models
