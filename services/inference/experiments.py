"""Experiments: a share of a feature's requests runs in a control arm, on the baseline
policy (the feature's baseline model, no cache, no routing), so that the treatment's
savings and quality can be compared on the same traffic.

The arm comes from the caller when it names an experiment (a replay or an
evaluation), else from the feature's configured experiment. A configured assignment
hashes the request id, so a retried request stays in its arm.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from costmesh.inference.v1 import inference_pb2
from costmesh.types.v1 import types_pb2
from services.common.config import Config, ConfigError
from services.common.errors import InvalidArgument

MAX_EXPERIMENT_NAME = 100


@dataclass(frozen=True)
class FeatureExperiment:
    """A feature's standing experiment: its name and the share sent to control."""

    name: str = ""
    control_share: float = 0.0

    @classmethod
    def from_config(cls, feature: Config) -> FeatureExperiment:
        name = feature.get_str("experiment", "")
        share = feature.get_float("control_share", 0.0)
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"{feature.key_name('control_share')}: must be between 0 and 1")
        if share and not name:
            raise ConfigError(
                f"{feature.key_name('experiment')}: name the experiment that control_share "
                "splits, so that its arms can be compared in the ledger"
            )
        if len(name) > MAX_EXPERIMENT_NAME:
            raise ConfigError(
                f"{feature.key_name('experiment')}: at most {MAX_EXPERIMENT_NAME} characters"
            )
        return cls(name, share)


@dataclass(frozen=True)
class Assignment:
    experiment: str
    arm: types_pb2.Arm.ValueType

    @property
    def control(self) -> bool:
        return self.arm == types_pb2.ARM_CONTROL


NONE = Assignment("", types_pb2.ARM_UNSPECIFIED)


def check(request: inference_pb2.CompleteRequest) -> None:
    """The caller's experiment fields, before anything is spent."""
    if len(request.experiment) > MAX_EXPERIMENT_NAME:
        raise InvalidArgument("experiment", f"at most {MAX_EXPERIMENT_NAME} characters")
    if not request.experiment.isprintable():
        # PostgreSQL cannot store NUL; other control characters are no name either.
        raise InvalidArgument("experiment", "must not contain control characters")
    if request.arm not in types_pb2.Arm.values():
        raise InvalidArgument("arm", f"unknown arm {request.arm}")
    if request.arm != types_pb2.ARM_UNSPECIFIED and not request.experiment:
        raise InvalidArgument("arm", "an arm needs the experiment it belongs to")


def assign(
    request: inference_pb2.CompleteRequest, standing: FeatureExperiment, request_id: str
) -> Assignment:
    """The caller's arm, else the feature's experiment's, else none."""
    if request.experiment:
        return Assignment(request.experiment, request.arm or types_pb2.ARM_TREATMENT)
    if not standing.name:
        return NONE
    draw = hashlib.sha256(f"{standing.name}\0{request_id}".encode()).digest()
    position = int.from_bytes(draw[:8], "big") / 2**64  # uniform in [0, 1)
    arm = types_pb2.ARM_CONTROL if position < standing.control_share else types_pb2.ARM_TREATMENT
    return Assignment(standing.name, arm)


# The arms' names on traces, in reports and in request ids.
ARM_NAMES = {types_pb2.ARM_CONTROL: "control", types_pb2.ARM_TREATMENT: "treatment"}


def arm_name(arm: types_pb2.Arm.ValueType) -> str:
    """ "control", "treatment", or "" (not in an experiment)."""
    return ARM_NAMES.get(arm, "")
