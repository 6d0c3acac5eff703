"""The one rule set for a SubmitBatch, queued or sent to a provider's Batch API: the
first problem refuses the whole batch, naming `requests[i].<field>`, before any of it
is queued or sent."""

from __future__ import annotations

from dataclasses import dataclass

from costmesh.inference.v1 import inference_pb2
from services.common.errors import InvalidArgument
from services.common.limits import MAX_REQUEST_ID
from services.inference.settings import InferenceSettings
from services.inference.validation import validate

# A batch request runs with f"{batch_id}:{caller's id}" as its request_id (a prefix
# of at most 8 characters and 32 hex digits), which must fit the mesh's limit.
MAX_CALLER_ID = MAX_REQUEST_ID - 8 - 32 - 1


@dataclass(frozen=True)
class BatchRules:
    """What differs between the two kinds of batch."""

    max_requests: int
    # A provider batch is billed and stored as one job of one feature.
    feature_required: bool
    # Provider batches run outside experiments: their fields are refused, not dropped.
    experiments: bool


@dataclass(frozen=True)
class Checked:
    caller_id: str
    request: inference_pb2.CompleteRequest  # a copy, with the batch's feature filled in
    max_tokens: int


def check_batch(
    batch: inference_pb2.SubmitBatchRequest, settings: InferenceSettings, rules: BatchRules
) -> list[Checked]:
    """Every request of a valid batch, else InvalidArgument naming the first problem."""
    count = len(batch.requests)
    if batch.feature and batch.feature not in settings.features:
        raise InvalidArgument("feature", f"unknown feature {batch.feature!r}")
    if rules.feature_required and not batch.feature:
        raise InvalidArgument("feature", "required: a provider batch is one feature's")
    if count == 0:
        raise InvalidArgument("requests", "at least one request is required")
    if count > rules.max_requests:
        raise InvalidArgument("requests", f"at most {rules.max_requests} requests, got {count}")
    seen: dict[str, int] = {}
    checked = []
    for i, original in enumerate(batch.requests):
        where = f"requests[{i}]"
        caller_id = original.request_id
        if caller_id in seen:
            raise InvalidArgument(
                f"{where}.request_id",
                f"{caller_id!r} is also requests[{seen[caller_id]}]'s; ids must be unique",
            )
        seen[caller_id] = i
        checked.append(_check_one(where, original, batch.feature, settings, rules))
    return checked


def _check_one(
    where: str,
    original: inference_pb2.CompleteRequest,
    feature: str,
    settings: InferenceSettings,
    rules: BatchRules,
) -> Checked:
    if not original.request_id:
        raise InvalidArgument(f"{where}.request_id", "required: results are matched by it")
    if len(original.request_id) > MAX_CALLER_ID:
        raise InvalidArgument(
            f"{where}.request_id", f"at most {MAX_CALLER_ID} characters in a batch"
        )
    if feature and original.feature and original.feature != feature:
        raise InvalidArgument(
            f"{where}.feature",
            f"{original.feature!r} differs from the batch's feature {feature!r};"
            " leave it empty or make it the same",
        )
    if not rules.experiments:
        for name in ("experiment", "arm"):
            if getattr(original, name):
                raise InvalidArgument(f"{where}.{name}", "not supported in provider batches")
    request = inference_pb2.CompleteRequest()
    request.CopyFrom(original)
    request.feature = request.feature or feature
    if not request.feature:
        raise InvalidArgument(f"{where}.feature", "required, here or in the batch's feature")
    try:
        _, max_tokens = validate(request, settings)
    except InvalidArgument as exc:
        field_name, description = exc.field_violations[0]
        raise InvalidArgument(f"{where}.{field_name}", description) from None
    return Checked(original.request_id, request, max_tokens)
