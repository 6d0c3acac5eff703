"""One rule set for both kinds of batch: what differs is stated, the rest is shared."""

from __future__ import annotations

import pytest

from costmesh.inference.v1 import inference_pb2
from costmesh.types.v1 import types_pb2
from services.common.config import load_config
from services.common.errors import InvalidArgument
from services.inference import batches, queue
from services.inference.batch_requests import MAX_CALLER_ID, check_batch
from services.inference.settings import InferenceSettings

SETTINGS = InferenceSettings.from_config(load_config(None, env={}))


def _batch(*ids: str, feature: str = "support") -> inference_pb2.SubmitBatchRequest:
    return inference_pb2.SubmitBatchRequest(
        feature=feature,
        requests=[
            inference_pb2.CompleteRequest(
                request_id=i,
                messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=f"q {i}")],
            )
            for i in ids
        ],
    )


def _refused(batch: inference_pb2.SubmitBatchRequest, rules: object) -> str:
    with pytest.raises(InvalidArgument) as refused:
        check_batch(batch, SETTINGS, rules)  # type: ignore[arg-type]
    return refused.value.field_violations[0][0]


@pytest.mark.parametrize("rules", [batches.RULES, queue.RULES], ids=["provider", "queue"])
def test_both_kinds_refuse_the_same_bad_requests(rules: object) -> None:
    assert _refused(_batch("a", "a"), rules) == "requests[1].request_id"
    assert _refused(_batch("a", ""), rules) == "requests[1].request_id"
    assert _refused(_batch("x" * (MAX_CALLER_ID + 1)), rules) == "requests[0].request_id"
    assert _refused(_batch(feature="support"), rules) == "requests"
    assert _refused(_batch("a", feature="nonesuch"), rules) == "feature"
    other = _batch("a", "b")
    other.requests[1].feature = "default"
    assert _refused(other, rules) == "requests[1].feature"
    empty = _batch("a")
    empty.requests[0].messages[0].content = ""
    assert _refused(empty, rules).startswith("requests[0].messages[0]")


def test_what_differs_is_stated_in_the_rules() -> None:
    unnamed = _batch("a", feature="")
    unnamed.requests[0].feature = "support"
    assert _refused(unnamed, batches.RULES) == "feature"  # one feature per provider job
    assert [c.request.feature for c in check_batch(unnamed, SETTINGS, queue.RULES)] == ["support"]
    in_experiment = _batch("a")
    in_experiment.requests[0].experiment = "checkout"
    assert _refused(in_experiment, batches.RULES) == "requests[0].experiment"
    (checked,) = check_batch(in_experiment, SETTINGS, queue.RULES)
    assert checked.request.experiment == "checkout"


def test_a_checked_request_is_a_copy_with_the_feature_filled_in() -> None:
    batch = _batch("a", feature="support")

    (checked,) = check_batch(batch, SETTINGS, queue.RULES)

    assert (checked.caller_id, checked.request.feature, checked.max_tokens) == ("a", "support", 512)
    assert batch.requests[0].feature == ""
