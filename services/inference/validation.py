"""Checks a CompleteRequest before anything is spent on it; every error names its field."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from costmesh.inference.v1 import inference_pb2
from costmesh.types.v1 import types_pb2
from services.common import limits as shared
from services.common.errors import InvalidArgument
from services.common.limits import check_printable
from services.inference import experiments
from services.inference.settings import FeatureLimits, InferenceSettings
from services.providers.tokens import count_prompt_tokens, prompt_tokens_at_most

if TYPE_CHECKING:  # the SDK's types cost 0.4 s to import, and are only annotations here
    from openai.types.chat.completion_create_params import ResponseFormat

MAX_REQUEST_ID = shared.MAX_REQUEST_ID
MAX_SCOPE_KEY = 256
MAX_STOP_SEQUENCES = 4


def estimate_tokens(messages: Sequence[types_pb2.ChatMessage], model: str = "") -> int:
    """Prompt tokens, counted offline with the model's OpenAI tokenizer, to refuse a
    prompt before anything is spent on it; the provider's usage is what is billed."""
    return count_prompt_tokens(messages, model)


MAX_NAME = 128  # characters of a cache namespace or tag
# OpenAI documents 5 levels for strict schemas; deeper ones only cost the parser.
MAX_SCHEMA_DEPTH = 64
MAX_TAGS = 32
_NAME = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_NAME}}}")


def validate(
    request: inference_pb2.CompleteRequest, settings: InferenceSettings
) -> tuple[FeatureLimits, int]:
    """The feature's limits and the effective max_tokens of a valid request."""
    if len(request.request_id) > MAX_REQUEST_ID:
        raise InvalidArgument("request_id", f"at most {MAX_REQUEST_ID} characters")
    check_printable("request_id", request.request_id)
    if not request.feature:
        raise InvalidArgument("feature", "required")
    limits = settings.features.get(request.feature)
    if limits is None:
        raise InvalidArgument(
            "feature", f"unknown feature {request.feature!r}", reason="UNKNOWN_FEATURE"
        )
    _validate_messages(request.messages)
    if request.model and request.model not in settings.models:
        raise InvalidArgument("model", f"unknown model {request.model!r}", reason="UNKNOWN_MODEL")
    if len(request.scope_key) > MAX_SCOPE_KEY:
        raise InvalidArgument("scope_key", f"at most {MAX_SCOPE_KEY} characters")
    _validate_cache_control(request.cache_control)
    experiments.check(request)
    if request.arm == types_pb2.ARM_CONTROL and not (request.model or limits.baseline_model):
        raise InvalidArgument("arm", f"feature {request.feature!r} has no baseline_model to run")
    max_tokens = _validate_params(request.params, limits)
    if prompt_tokens_at_most(request.messages) <= limits.max_input_tokens:
        return limits, max_tokens  # fits without counting (most prompts: no tokenising)
    prompt_tokens = estimate_tokens(request.messages)
    if prompt_tokens > limits.max_input_tokens:
        raise InvalidArgument(
            "messages",
            f"prompt is about {prompt_tokens} tokens; feature {request.feature!r} accepts "
            f"at most {limits.max_input_tokens}",
            reason="PROMPT_TOO_LONG",
        )
    return limits, max_tokens


def _validate_cache_control(control: inference_pb2.CacheControl) -> None:
    """Namespaces and tags name cache partitions and sets: keep them few and short."""
    if control.max_age_seconds < 0:
        raise InvalidArgument("cache_control.max_age_seconds", "must not be negative")
    if control.HasField("similarity_threshold") and not 0 <= control.similarity_threshold <= 1:
        raise InvalidArgument("cache_control.similarity_threshold", "must be between 0 and 1")
    if not _NAME.fullmatch(control.namespace or "-"):
        raise InvalidArgument(
            "cache_control.namespace", f"letters, digits and ._:- only, at most {MAX_NAME}"
        )
    if len(control.tags) > MAX_TAGS:
        raise InvalidArgument("cache_control.tags", f"at most {MAX_TAGS} tags")
    for tag in control.tags:
        if not _NAME.fullmatch(tag):
            raise InvalidArgument(
                "cache_control.tags", f"letters, digits and ._:- only, 1 to {MAX_NAME}"
            )


def check_context_window(prompt_tokens: int, max_tokens: int, model: str, window: int) -> None:
    if prompt_tokens + max_tokens > window:
        raise InvalidArgument(
            "messages",
            f"prompt (about {prompt_tokens} tokens) plus max_tokens {max_tokens} exceeds "
            f"the {window}-token context window of {model}",
            reason="PROMPT_TOO_LONG",
        )


def _validate_messages(items: Sequence[types_pb2.ChatMessage]) -> None:
    if not items:
        raise InvalidArgument("messages", "at least one message is required")
    for i, message in enumerate(items):
        if (
            message.role == types_pb2.ROLE_UNSPECIFIED
            or message.role not in types_pb2.Role.values()
        ):
            raise InvalidArgument(f"messages[{i}].role", "must be SYSTEM, USER or ASSISTANT")
        if not message.content.strip():
            raise InvalidArgument(f"messages[{i}].content", "must not be empty")
    if not any(m.role == types_pb2.ROLE_USER for m in items):
        raise InvalidArgument("messages", "at least one user message is required")


def _validate_params(params: types_pb2.GenerationParams, limits: FeatureLimits) -> int:
    max_tokens = limits.max_tokens_default
    if params.HasField("max_tokens"):
        if params.max_tokens < 1:
            raise InvalidArgument("params.max_tokens", "must be at least 1")
        if params.max_tokens > limits.max_tokens_limit:
            raise InvalidArgument(
                "params.max_tokens",
                f"at most {limits.max_tokens_limit} for this feature",
                reason="MAX_TOKENS_OVER_LIMIT",
            )
        max_tokens = params.max_tokens
    if params.HasField("temperature") and not 0 <= params.temperature <= 2:
        raise InvalidArgument("params.temperature", "must be between 0 and 2")
    if params.HasField("top_p") and not 0 <= params.top_p <= 1:
        raise InvalidArgument("params.top_p", "must be between 0 and 1")
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("params.stop", f"at most {MAX_STOP_SEQUENCES} sequences")
    _validate_response_format(params.response_format)
    return max_tokens


_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _validate_response_format(fmt: types_pb2.ResponseFormat) -> None:
    """A structured-output request the provider would refuse is refused here first."""
    if fmt.type not in types_pb2.ResponseFormat.Type.values():
        raise InvalidArgument("params.response_format.type", "unknown type")
    if fmt.type != types_pb2.ResponseFormat.TYPE_JSON_SCHEMA:
        if fmt.schema_name or fmt.json_schema or fmt.strict:
            raise InvalidArgument(
                "params.response_format",
                "schema_name, json_schema and strict need TYPE_JSON_SCHEMA",
            )
        return
    if not _SCHEMA_NAME.fullmatch(fmt.schema_name):
        raise InvalidArgument(
            "params.response_format.schema_name", "letters, digits, _ and -, 1 to 64 characters"
        )
    too_deep = False
    try:
        schema = json.loads(fmt.json_schema)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            "params.response_format.json_schema", f"not JSON: {exc.msg}", reason="INVALID_SCHEMA"
        ) from None
    except RecursionError:  # nested deeper than Python's parser goes
        schema, too_deep = None, True
    if too_deep or _depth(schema) > MAX_SCHEMA_DEPTH:
        raise InvalidArgument(
            "params.response_format.json_schema",
            f"nested deeper than {MAX_SCHEMA_DEPTH} levels",
            reason="INVALID_SCHEMA",
        )
    if not isinstance(schema, dict):
        raise InvalidArgument(
            "params.response_format.json_schema", "must be a JSON object", reason="INVALID_SCHEMA"
        )


def _depth(value: object) -> int:
    """How deeply objects and arrays nest in a parsed JSON value (without recursing)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            todo += [(v, level + 1) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest


def openai_response_format(fmt: types_pb2.ResponseFormat) -> ResponseFormat | None:
    """The OpenAI `response_format` of a validated request; None for free text."""
    if fmt.type == types_pb2.ResponseFormat.TYPE_JSON_OBJECT:
        return {"type": "json_object"}
    if fmt.type == types_pb2.ResponseFormat.TYPE_JSON_SCHEMA:
        return {
            "type": "json_schema",
            "json_schema": {
                "name": fmt.schema_name,
                "schema": json.loads(fmt.json_schema),
                "strict": fmt.strict,
            },
        }
    return None
