"""Per-feature model plans: which tier a feature's requests get and which model serves it."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import Config, ConfigError

TIERS = ("simple", "moderate", "complex")


@dataclass(frozen=True)
class Decision:
    tier: str
    model: str
    escalation_model: str
    confidence: float
    reason: str


@dataclass(frozen=True)
class FeaturePlan:
    """Rules routing: a fixed tier per feature, mapped to a model per tier."""

    tier: str
    models: dict[str, str]
    escalation_model: str

    def decide(self, feature: str, requested_model: str) -> Decision:
        if requested_model:
            return Decision(
                self.tier,
                requested_model,
                "",
                1.0,
                f"caller asked for {requested_model}; routing skipped",
            )
        model = self.models[self.tier]
        escalation = self.escalation_model if self.escalation_model != model else ""
        return Decision(
            self.tier,
            model,
            escalation,
            1.0,
            f"feature {feature!r} routes every request to tier {self.tier} (rules) -> {model}",
        )


def load_plans(features: Config, known_models: set[str]) -> dict[str, FeaturePlan]:
    """Read and check every [features.*] plan; an unknown model or tier names its key."""
    plans = {}
    for name in features.names():
        feature = features.section(name)
        tier = feature.get_choice("tier", TIERS, "simple")
        models_table = feature.section("models")
        models = {t: models_table.get_str(t) for t in TIERS}
        for t, model in models.items():
            if not model:
                raise ConfigError(f"features.{name}.models.{t}: must name a model")
        escalation = feature.get_str("escalation_model", "")
        for key, model in [
            *((f"models.{t}", m) for t, m in models.items()),
            ("escalation_model", escalation),
        ]:
            if model and model not in known_models:
                raise ConfigError(f"features.{name}.{key}: unknown model {model!r}")
        plans[name] = FeaturePlan(tier, models, escalation)
    return plans
