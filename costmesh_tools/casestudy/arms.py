"""A workload request as the mesh receives it in an experiment's arm: one place that
decides the request id (unique per experiment and arm, so a rerun is answered afresh
rather than replayed by the mesh's idempotency), the treatment's cache namespace (one
per experiment, so a cached answer comes from this experiment's own traffic, never from
an earlier run's) and what is sent."""

from __future__ import annotations

import hashlib
import re

from costmesh.inference.v1 import inference_pb2
from costmesh.types.v1 import types_pb2
from costmesh_tools.casestudy.workload import WorkloadRequest, chat_messages
from services.common.limits import MAX_REQUEST_ID
from services.inference.experiments import ARM_NAMES
from services.inference.validation import MAX_NAME

# What the mesh accepts as a cache namespace (services/inference/validation.py).
_NAMESPACE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_NAME}}}")
_PREFIX = "experiment:"


def request_id(experiment: str, arm: str, workload_id: str) -> str:
    """`experiment:arm:workload id`; a long workload id is shortened to its digest."""
    rid = f"{experiment}:{arm}:{workload_id}"
    if len(rid) <= MAX_REQUEST_ID:
        return rid
    digest = hashlib.sha256(workload_id.encode()).hexdigest()[:32]
    return f"{experiment}:{arm}:{digest}"[:MAX_REQUEST_ID]


def cache_namespace(experiment: str) -> str:
    """The treatment's cache namespace in `experiment`: `experiment:<name>`, or
    `experiment:<digest of the name>` when the name has characters (or a length) a
    namespace cannot have."""
    namespace = _PREFIX + experiment
    if _NAMESPACE.fullmatch(namespace):
        return namespace
    return _PREFIX + hashlib.sha256(experiment.encode()).hexdigest()[:32]


def complete_request(
    request: WorkloadRequest, experiment: str, arm: types_pb2.Arm.ValueType
) -> inference_pb2.CompleteRequest:
    """The recorded request itself (feature, messages, max_tokens) in `arm`; in the
    treatment, cached under the experiment's own namespace."""
    call = inference_pb2.CompleteRequest(
        request_id=request_id(experiment, ARM_NAMES[arm], request.id),
        feature=request.feature,
        messages=chat_messages(request),
        experiment=experiment,
        arm=arm,
    )
    if request.max_tokens is not None:
        call.params.max_tokens = request.max_tokens
    if arm == types_pb2.ARM_TREATMENT:
        call.cache_control.namespace = cache_namespace(experiment)
    return call
