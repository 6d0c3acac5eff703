"""Cache settings read from the mesh configuration, checked at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import trace

from services.cache.keys import QUESTION_MODES
from services.cache.semantic import DEFAULT_TARGET, FeaturePolicy
from services.cache.store import Capacity
from services.common.config import Config, ConfigError
from services.common.embedding import (
    MINILM_DIMENSIONS,
    BatchingEmbedder,
    Embedder,
    ModelError,
    OpenAIEmbedder,
    shared_encoder,
)

CACHE_MODES = ("semantic", "exact", "off")


@dataclass(frozen=True)
class CacheSettings:
    backend: str
    redis_url: str
    redis_prefix: str
    ann_threshold: int
    policies: dict[str, FeaturePolicy]
    embedding_provider: str
    embedding_model: str
    embedding_dimensions: int
    embedding_threads: int
    model_dir: Path | None
    provider_base_url: str
    provider_api_key_env: str

    @classmethod
    def from_config(cls, config: Config) -> CacheSettings:
        cache = config.section("cache")
        default_capacity = Capacity(
            cache.get_int("max_entries", 100_000, minimum=1),
            cache.get_int("max_bytes", 0, minimum=0),
        )
        features = config.section("features")
        policies = {
            name: _policy(features.section(name), default_capacity) for name in features.names()
        }
        policies.setdefault("default", FeaturePolicy(capacity=default_capacity))
        provider = cache.get_str("embedding_provider", "local")
        base_url = api_key_env = ""
        if provider != "local":
            providers = config.section("providers")
            if provider not in providers.names():
                raise ConfigError(f"cache.embedding_provider: unknown provider {provider!r}")
            base_url = providers.section(provider).get_str("base_url")
            api_key_env = providers.section(provider).get_str("api_key_env")
        model_dir = cache.get_str("model_dir", "")
        return cls(
            backend=cache.get_choice("backend", ("memory", "redis"), "memory"),
            redis_url=cache.get_str("redis_url", "redis://127.0.0.1:6379/0"),
            redis_prefix=cache.get_str("redis_prefix", "costmesh:cache"),
            ann_threshold=cache.get_int("ann_threshold", 3000, minimum=0),
            policies=policies,
            embedding_provider=provider,
            embedding_model=cache.get_str("embedding_model", ""),
            embedding_dimensions=cache.get_int(
                "embedding_dimensions", MINILM_DIMENSIONS, minimum=1
            ),
            embedding_threads=cache.get_int("embedding_threads", 1, minimum=1),
            model_dir=Path(model_dir) if model_dir else None,
            provider_base_url=base_url,
            provider_api_key_env=api_key_env,
        )

    def embedder(
        self, timeout: float, tracer: trace.Tracer, env: Mapping[str, str]
    ) -> Embedder | None:
        """The configured embedder, or None when no feature caches semantically."""
        if not any(p.semantic for p in self.policies.values()):
            return None
        if self.embedding_provider == "local":
            try:
                model = shared_encoder(self.model_dir, self.embedding_threads)
            except (ModelError, OSError) as exc:
                raise ConfigError(f"cache.model_dir: {exc}") from None
            if self.embedding_model and self.embedding_model != model.model:
                raise ConfigError(
                    f"cache.embedding_model: unknown model version {self.embedding_model!r}; "
                    f"the local model is {model.model!r} (leave it empty to use whichever "
                    "model cache.model_dir holds)"
                )
            return BatchingEmbedder(
                model.model,
                model.dimensions,
                model.embed_sync,
                tracer=tracer,
                thresholds=model.thresholds,
            )
        if not self.embedding_model:
            raise ConfigError(
                f"cache.embedding_model: name the model {self.embedding_provider!r} embeds with"
            )
        api_key = env.get(self.provider_api_key_env, "")
        if not api_key:
            raise ConfigError(
                f"cache.embedding_provider {self.embedding_provider!r} needs its key in "
                f"{self.provider_api_key_env}"
            )
        return OpenAIEmbedder(
            self.embedding_model,
            self.embedding_dimensions,
            self.provider_base_url,
            api_key,
            timeout=timeout,
            tracer=tracer,
        )


def _policy(feature: Config, default_capacity: Capacity) -> FeaturePolicy:
    mode = feature.get_choice("cache_mode", CACHE_MODES, "semantic")
    threshold = feature.get_float("cache_similarity_threshold", 0.0)
    if not 0 <= threshold <= 1:
        raise ConfigError(
            f"{feature.key_name('cache_similarity_threshold')}: must be in (0, 1], "
            "or 0 for the threshold calibrated for cache_target_false_hit_rate"
        )
    target = feature.get_float("cache_target_false_hit_rate", DEFAULT_TARGET)
    if not 0 < target < 1:
        raise ConfigError(f"{feature.key_name('cache_target_false_hit_rate')}: must be in (0, 1)")
    return FeaturePolicy(
        semantic=mode == "semantic",
        threshold=threshold or None,
        target_false_hit_rate=target,
        question_mode=feature.get_choice("cache_question", QUESTION_MODES, "last_user"),
        ttl_seconds=feature.get_int("cache_ttl_seconds", 3600, minimum=1),
        capacity=Capacity(
            feature.get_int("cache_max_entries", default_capacity.max_entries, minimum=1),
            feature.get_int("cache_max_bytes", default_capacity.max_bytes, minimum=0),
        ),
        per_tenant=feature.get_bool("cache_per_tenant", False),
    )
