"""A workload request as the mesh receives it in an experiment's arm: one place that
decides the request id (unique per experiment and arm, so a rerun is answered afresh
rather than replayed by the mesh's idempotency) and what is sent."""

from __future__ import annotations

import hashlib

from costmesh.inference.v1 import inference_pb2
from costmesh.types.v1 import types_pb2
from services.casestudy.workload import WorkloadRequest, chat_messages
from services.inference.validation import MAX_REQUEST_ID

ARM_NAMES = {types_pb2.ARM_CONTROL: "control", types_pb2.ARM_TREATMENT: "treatment"}


def request_id(experiment: str, arm: str, workload_id: str) -> str:
    """`experiment:arm:workload id`; a long workload id is shortened to its digest."""
    rid = f"{experiment}:{arm}:{workload_id}"
    if len(rid) <= MAX_REQUEST_ID:
        return rid
    digest = hashlib.sha256(workload_id.encode()).hexdigest()[:32]
    return f"{experiment}:{arm}:{digest}"[:MAX_REQUEST_ID]


def complete_request(
    request: WorkloadRequest, experiment: str, arm: types_pb2.Arm.ValueType
) -> inference_pb2.CompleteRequest:
    """The recorded request itself (feature, messages, max_tokens) in `arm`."""
    call = inference_pb2.CompleteRequest(
        request_id=request_id(experiment, ARM_NAMES[arm], request.id),
        feature=request.feature,
        messages=chat_messages(request),
        experiment=experiment,
        arm=arm,
    )
    if request.max_tokens is not None:
        call.params.max_tokens = request.max_tokens
    return call
