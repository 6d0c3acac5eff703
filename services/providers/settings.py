"""The provider and model registry, and how provider calls are retried: read from the
configuration once, shared by inference and the router's `llm` classifier."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config import Config, ConfigError
from services.providers.resilience import RetryPolicy


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
class ProviderSettings:
    """What calling providers needs: who serves each model, and how hard to try."""

    models: dict[str, ModelInfo]
    providers: dict[str, ProviderInfo]
    provider_timeout_seconds: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    attempt_timeout_seconds: float = 30.0
    cooldown_failures: int = 5
    cooldown_seconds: float = 1.5
    cooldown_first_seconds: float = 1.0

    @classmethod
    def from_config(cls, config: Config) -> ProviderSettings:
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
        inference = config.section("inference")
        for key in (
            "provider_timeout_seconds",
            "attempt_timeout_seconds",
            "retry_base_seconds",
            "retry_max_seconds",
            "cooldown_seconds",
            "cooldown_first_seconds",
        ):
            if key in inference.names() and not inference.get_float(key) > 0:
                raise ConfigError(f"inference.{key}: must be positive")
        first = inference.get_float("cooldown_first_seconds", 1.0)
        if first > inference.get_float("cooldown_seconds", 1.5):
            raise ConfigError(
                f"inference.cooldown_first_seconds: {first:g} is more than cooldown_seconds, "
                "the longest a cool-down lasts"
            )
        return cls(
            models=_models(config.section("models"), set(providers)),
            providers=providers,
            provider_timeout_seconds=inference.get_float("provider_timeout_seconds", 60.0),
            retry=RetryPolicy(
                inference.get_int("max_attempts", 3, minimum=1),
                inference.get_float("retry_base_seconds", 0.25),
                inference.get_float("retry_max_seconds", 8.0),
            ),
            attempt_timeout_seconds=inference.get_float("attempt_timeout_seconds", 30.0),
            cooldown_failures=inference.get_int("cooldown_failures", 5, minimum=1),
            cooldown_seconds=inference.get_float("cooldown_seconds", 1.5),
            cooldown_first_seconds=inference.get_float("cooldown_first_seconds", 1.0),
        )


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
