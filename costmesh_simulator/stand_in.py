"""Where the simulator stands in for a provider: `costmesh serve` with every service in
one process and a provider whose key is missing (and `simulate_without_key`). The
composition root starts it and hands providers its base URL; nothing in the mesh
knows it is not a real provider, except the label on the usage rows."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from costmesh_simulator.knowledge import TIERS, Knowledge, KnowledgeError
from costmesh_simulator.realism import DEFAULT_MODEL_TIERS
from costmesh_simulator.server import OpenAISimulator
from services.common.config import Config, ConfigError

log = logging.getLogger(__name__)
# Provider batches finish on their own after this long, as a demo expects.
DEMO_BATCH_SECONDS = 5.0


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
    def from_config(cls, config: Config) -> SimulatorSettings:
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
        return cls(realistic, scale, knowledge, seed, model_tiers(config))

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


def model_tiers(config: Config) -> dict[str, str]:
    """A model's configured tier; else, for a model the simulator knows (gpt-4o,
    gpt-4o-mini), its own; else the highest tier a feature uses it for (an escalation
    model counts as complex). How a config routes a known model does not make it
    stronger: gpt-4o-mini on complex tickets answers them as a small model would."""
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
    tiers |= DEFAULT_MODEL_TIERS
    models = config.section("models")
    for name in models.names():
        tier = models.section(name).get_str("tier", "")
        if tier:
            tiers[name] = tier
    return tiers


@dataclass
class StandIns:
    """The simulators started for keyless providers, by provider name."""

    base_urls: dict[str, str] = field(default_factory=dict)
    simulators: list[OpenAISimulator] = field(default_factory=list)

    def stop(self) -> None:
        for simulator in self.simulators:
            simulator.stop()


def start_stand_ins(config: Config, env: Mapping[str, str]) -> StandIns:
    """One simulator for every provider whose key is missing and that allows it."""
    providers = config.section("providers")
    keyless = [
        name
        for name in providers.names()
        if providers.section(name).get_bool("simulate_without_key", False)
        and not env.get(providers.section(name).get_str("api_key_env", ""), "")
    ]
    stand_ins = StandIns()
    if not keyless:
        return stand_ins
    settings = SimulatorSettings.from_config(config)
    simulator = OpenAISimulator(
        realistic=settings.realistic,
        latency_scale=settings.latency_scale,
        knowledge=settings.knowledge,
        seed=settings.seed,
        model_tiers=settings.model_tiers,
        keep_requests=False,  # it runs as long as the mesh: no memory per call
    )
    simulator.set_batch_auto_complete(DEMO_BATCH_SECONDS)
    base_url = simulator.start()
    stand_ins.simulators.append(simulator)
    for name in keyless:
        stand_ins.base_urls[name] = base_url
        log.warning(
            "%s is not set: provider %r answers from the local SIMULATOR (%s); %s",
            providers.section(name).get_str("api_key_env", ""),
            name,
            base_url,
            settings.describe(),
        )
    return stand_ins
