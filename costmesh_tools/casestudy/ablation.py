"""Ablation arms: the treatment replayed once more with one lever switched off, each run
an experiment of its own, so that each lever's share of the saving is measured rather
than attributed row by row.

The cache is switched off with `cache_control.no_cache` and `no_store` (no look-up, no
embedding, nothing stored); routing by naming the feature's baseline model in the
request (the model control answers with): the mesh answers with the named model
whatever the router would have chosen. A named model is also never downgraded for a
team's budget, so a team over budget is refused there and the ablation gives way to a
note.

With both levers on (the treatment), both off (control) and each off alone, a lever's
share is its Shapley value: its saving averaged over the two orders it can be switched
on in. The shares sum to control's cost minus the treatment's, and what the levers do
together (a cache hit saves less once the request would have gone to a cheap model
anyway) is split evenly instead of going to whichever lever is counted first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from costmesh.inference.v1 import inference_pb2
from costmesh.ledger.v1 import ledger_pb2
from costmesh.types.v1 import types_pb2

CACHE, ROUTING = "cache", "routing"
LEVERS = (CACHE, ROUTING)


def experiment_without(experiment: str, lever: str) -> str:
    """The experiment a lever's ablation run is recorded under."""
    return f"{experiment}.no-{lever}"


def switch_off(
    call: inference_pb2.CompleteRequest, lever: str, baselines: Mapping[str, str]
) -> inference_pb2.CompleteRequest:
    """`call` (a treatment request) with `lever` switched off. KeyError for a feature
    without a baseline model."""
    if lever == CACHE:
        call.cache_control.no_cache = True
        call.cache_control.no_store = True
    elif lever == ROUTING:
        call.model = baselines[call.feature]
    else:
        raise ValueError(f"lever: expected one of {', '.join(LEVERS)}, got {lever!r}")
    return call


def baseline_models(rows: Iterable[ledger_pb2.UsageRecord]) -> dict[str, str]:
    """Each feature's baseline model: the model its control answers came from."""
    seen: dict[str, Counter[str]] = {}
    for row in rows:
        if row.arm == types_pb2.ARM_CONTROL and row.model:
            seen.setdefault(row.feature, Counter())[row.model] += 1
    return {feature: models.most_common(1)[0][0] for feature, models in seen.items()}


def cost(rows: Iterable[ledger_pb2.UsageRecord], arm: types_pb2.Arm.ValueType) -> int:
    """Everything an arm's rows cost, overhead (routing calls, embeddings) included."""
    return sum(row.cost_nano_usd for row in rows if row.arm == arm)


@dataclass(frozen=True)
class Ablation:
    """The cost of the same requests under control, the treatment, and the treatment
    with each lever off, in nano-USD."""

    control: int
    treatment: int
    without: Mapping[str, int]  # lever -> the treatment's cost with that lever off

    @property
    def saving(self) -> int:
        return self.control - self.treatment

    def shares(self) -> list[tuple[str, int]]:
        """(lever, nano-USD of the saving it earns), Shapley over two levers: half its
        saving when switched on first (from control), half when switched on last (the
        treatment against the run without it). Needs both levers' runs."""
        first, second = LEVERS
        on_alone = self.without[second]  # the first lever on, the second off
        earned = (self.control - on_alone + self.without[first] - self.treatment) // 2
        return [(first, earned), (second, self.saving - earned)]  # to the nano-dollar
