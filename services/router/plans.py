"""Per-feature routing plans read from the configuration, checked at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.config import Config, ConfigError
from services.router.artefact import TIERS

CLASSIFIERS = ("embedding", "llm", "rules")
ESCALATION_METHODS = ("off", "self_rating", "logprobs")
# The artefact that ships with costmesh: trained on the Bitext (e-commerce) and
# Banking77 support sets with their tiers.json (`make router-artefact` rebuilds it).
SHIPPED_ARTEFACT = Path(__file__).resolve().parent / "support-tiers.npz"


@dataclass(frozen=True)
class FeaturePlan:
    classifier: str
    tier: str  # the rules classifier's fixed tier
    models: dict[str, str]
    escalation_model: str
    # The cost/quality knob: the probability a request needs of needing at most a
    # cheaper tier before it may go there.
    cheap_tier_min_probability: float
    cheap_share_target: float  # 0: use the knob as it is
    artefact: Path
    classifier_model: str  # the llm classifier's model
    escalation_method: str
    escalation_threshold: float
    escalation_target_rate: float
    # Where a question the embedding classifier's data does not cover goes: the
    # complex tier (the safe choice), or the llm classifier (billed).
    out_of_domain: str = "complex"


OUT_OF_DOMAIN = ("complex", "llm")


@dataclass(frozen=True)
class RouterSettings:
    plans: dict[str, FeaturePlan]
    reload_seconds: float
    calibration_window: int
    model_dir: Path | None
    embedding_threads: int

    @classmethod
    def from_config(cls, config: Config) -> RouterSettings:
        known_models = set(config.section("models").names())
        router = config.section("router")
        shipped = router.get_str("artefact", "")
        default_artefact = Path(shipped) if shipped else SHIPPED_ARTEFACT
        features = config.section("features")
        plans = {
            name: _plan(features.section(name), name, known_models, default_artefact)
            for name in features.names()
        }
        reload_seconds = router.get_float("reload_seconds", 10.0)
        if reload_seconds < 0:
            raise ConfigError("router.reload_seconds: must not be negative")
        model_dir = router.get_str("model_dir", "")
        return cls(
            plans,
            reload_seconds,
            router.get_int("calibration_window", 2000, minimum=1),
            Path(model_dir) if model_dir else None,
            router.get_int("embedding_threads", 1, minimum=1),
        )


def _plan(feature: Config, name: str, known_models: set[str], artefact: Path) -> FeaturePlan:
    models_table = feature.section("models")
    models = {t: models_table.get_str(t) for t in TIERS}
    for t, model in models.items():
        if not model:
            raise ConfigError(f"features.{name}.models.{t}: must name a model")
    escalation = feature.get_str("escalation_model", "")
    classifier_model = feature.get_str("router_model", "gpt-4o-mini")
    for key, model in [
        *((f"models.{t}", m) for t, m in models.items()),
        ("escalation_model", escalation),
        ("router_model", classifier_model),
    ]:
        if model and model not in known_models:
            raise ConfigError(f"features.{name}.{key}: unknown model {model!r}")
    own_artefact = feature.get_str("router_artefact", "")
    method = feature.get_choice("escalation", ESCALATION_METHODS, "off")
    if method != "off" and not escalation:
        raise ConfigError(f"features.{name}.escalation_model: {method} escalation needs a model")
    return FeaturePlan(
        classifier=feature.get_choice("router", CLASSIFIERS, "embedding"),
        tier=feature.get_choice("tier", TIERS, "simple"),
        models=models,
        escalation_model=escalation,
        cheap_tier_min_probability=_share(feature, name, "cheap_tier_min_probability", 0.6),
        cheap_share_target=_share(feature, name, "cheap_share_target", 0.0),
        artefact=Path(own_artefact) if own_artefact else artefact,
        classifier_model=classifier_model,
        escalation_method=method,
        escalation_threshold=_share(feature, name, "escalation_threshold", 0.0),
        escalation_target_rate=_share(feature, name, "escalation_target_rate", 0.0),
        out_of_domain=feature.get_choice("router_out_of_domain", OUT_OF_DOMAIN, "complex"),
    )


def _share(feature: Config, name: str, key: str, default: float) -> float:
    value = feature.get_float(key, default)
    if not 0 <= value <= 1:
        raise ConfigError(f"features.{name}.{key}: must be between 0 and 1, got {value}")
    return value
