"""OpenAI's chat-completions JSON, translated to and from the mesh's messages.

What a request may carry is checked here, field by field, with OpenAI's own error
shape; what the mesh cannot honour (tools, several choices, images) is refused by
name rather than silently ignored. The costmesh controls come from `x-costmesh-*`
headers or, for callers that cannot set headers, from `metadata`."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from costmesh.inference.v1 import inference_pb2
from costmesh.types.v1 import types_pb2

AUTO_MODEL = "auto"  # the router decides; any configured model name pins that model
_ROLES = {
    "system": types_pb2.ROLE_SYSTEM,
    "developer": types_pb2.ROLE_SYSTEM,
    "user": types_pb2.ROLE_USER,
    "assistant": types_pb2.ROLE_ASSISTANT,
}
_TIERS = {
    types_pb2.TIER_SIMPLE: "simple",
    types_pb2.TIER_MODERATE: "moderate",
    types_pb2.TIER_COMPLEX: "complex",
}
_OUTCOMES = {
    types_pb2.CACHE_OUTCOME_MISS: "miss",
    types_pb2.CACHE_OUTCOME_EXACT: "exact",
    types_pb2.CACHE_OUTCOME_SEMANTIC: "semantic",
    types_pb2.CACHE_OUTCOME_BYPASS: "bypass",
}
_ARMS = {"": types_pb2.ARM_UNSPECIFIED, "treatment": types_pb2.ARM_TREATMENT,
         "control": types_pb2.ARM_CONTROL}  # fmt: skip
# Accepted and without effect on the answer the mesh gives.
_IGNORED = {"user", "store", "service_tier", "parallel_tool_calls", "prediction"}
_REFUSED = {
    "tools": "tools and function calling are not supported by costmesh; call the provider "
    "directly for tool use",
    "functions": "function calling is not supported by costmesh",
    "tool_choice": "tool_choice needs tools, which costmesh does not support",
    "logprobs": "logprobs are not returned by costmesh",
    "top_logprobs": "logprobs are not returned by costmesh",
    "logit_bias": "logit_bias is not supported by costmesh",
    "audio": "audio output is not supported by costmesh",
    "modalities": "only text output is supported by costmesh",
    "frequency_penalty": "frequency_penalty is not supported by costmesh",
    "presence_penalty": "presence_penalty is not supported by costmesh",
    "reasoning_effort": "reasoning_effort is not supported by costmesh",
    "web_search_options": "web search is not supported by costmesh",
}


class WireError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.reason = reason  # the mesh's ErrorInfo reason (docs/errors.md), if any

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }
        if self.reason:
            error["costmesh_reason"] = self.reason
        return {"error": error}


def invalid(param: str, message: str) -> WireError:
    return WireError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass(frozen=True)
class ChatCall:
    """One parsed /v1/chat/completions body."""

    request: inference_pb2.CompleteRequest
    stream: bool
    include_usage: bool
    asked_model: str


def parse_chat(body: Any, headers: Mapping[str, str], models: frozenset[str]) -> ChatCall:
    """A CompleteRequest from an OpenAI body and the x-costmesh-* headers."""
    if not isinstance(body, dict):
        raise WireError(400, "the request body must be a JSON object")
    for name, why in _REFUSED.items():
        if body.get(name) not in (None, False, [], {}):
            raise WireError(400, why, param=name, code="unsupported_parameter")
    known = {
        "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
        "temperature", "top_p", "stop", "response_format", "seed", "n", "metadata",
        *_IGNORED, *_REFUSED,
    }  # fmt: skip
    unknown = sorted(set(body) - known)
    if unknown:
        raise WireError(
            400, f"unrecognised request argument: {unknown[0]}", param=unknown[0],
            code="unknown_parameter",
        )  # fmt: skip
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", f"name a model: {AUTO_MODEL!r} lets costmesh route")
    if model != AUTO_MODEL and model not in models:
        raise WireError(
            404,
            f"The model {model!r} does not exist in this mesh; GET /v1/models lists them "
            f"({AUTO_MODEL!r} lets the router choose)",
            param="model",
            code="model_not_found",
        )
    if body.get("n", 1) != 1:
        raise WireError(400, "costmesh returns one choice: n must be 1", param="n",
                        code="unsupported_value")  # fmt: skip
    metadata = _metadata(body.get("metadata"))
    controls = {**metadata, **{k[len("x-costmesh-") :]: v for k, v in headers.items()
                               if k.startswith("x-costmesh-")}}  # fmt: skip
    request = inference_pb2.CompleteRequest(
        request_id=controls.get("request-id", ""),
        feature=controls.get("feature", "default"),
        messages=_messages(body.get("messages")),
        model="" if model == AUTO_MODEL else model,
        params=_params(body),
        cache_control=_cache_control(controls),
        scope_key=controls.get("scope", ""),
        experiment=controls.get("experiment", ""),
        arm=_arm(controls.get("arm", "")),
    )
    stream = _flag(body.get("stream", False), "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options", "must be an object")
    return ChatCall(
        request, stream, _flag(options.get("include_usage", False), "stream_options"), model
    )


def _flag(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(param, "must be true or false")
    return value


def _metadata(value: Any) -> dict[str, str]:
    """OpenAI's metadata (string values); costmesh reads its costmesh_* keys."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise invalid("metadata", "must be an object of string values")
    return {
        str(k)[len("costmesh_") :].replace("_", "-"): v
        for k, v in value.items()
        if str(k).startswith("costmesh_")
    }


def _messages(value: Any) -> list[types_pb2.ChatMessage]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "must be a non-empty array")
    out = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(param, "must be an object")
        role = message.get("role")
        if role not in _ROLES:
            raise invalid(
                f"{param}.role",
                f"{role!r} is not supported (system, developer, user or assistant; "
                "tool messages need tools, which costmesh does not support)",
            )
        out.append(types_pb2.ChatMessage(role=_ROLES[role], content=_text(message, param)))
    return out


def _text(message: dict[str, Any], param: str) -> str:
    """A message's text: a string, or text parts (other parts are refused)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(f"{param}.content[{j}]", "only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise invalid(f"{param}.content[{j}].text", "must be a string")
            texts.append(part["text"])
        return "".join(texts)
    if content is None and message.get("role") == "assistant":
        return ""
    raise invalid(f"{param}.content", "must be a string or an array of text parts")


def _params(body: dict[str, Any]) -> types_pb2.GenerationParams:
    params = types_pb2.GenerationParams()
    limit = _max_tokens(body)
    if limit is not None:
        params.max_tokens = limit
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        value = body.get(name)
        if value is None:
            continue
        if not _number(value) or not low <= value <= high:
            raise invalid(name, f"must be a number from {low:g} to {high:g}")
        setattr(params, name, float(value))
    params.stop.extend(_stop(body.get("stop")))
    seed = body.get("seed")
    if seed is not None:
        if not _integer(seed) or not -(2**63) <= seed < 2**63:
            raise invalid("seed", "must be an integer")
        params.seed = seed
    _response_format(body.get("response_format"), params.response_format)
    return params


def _max_tokens(body: dict[str, Any]) -> int | None:
    """max_completion_tokens, or the older max_tokens."""
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    limit = body.get(name)
    if limit is not None and (not _integer(limit) or not 1 <= limit < 2**31):
        raise invalid(name, "must be a positive integer")
    return limit


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise invalid("stop", "must be a string or an array of strings")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _response_format(value: Any, out: types_pb2.ResponseFormat) -> None:
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        out.type = types_pb2.ResponseFormat.TYPE_JSON_OBJECT
        return
    if kind != "json_schema":
        raise invalid("response_format", "type must be text, json_object or json_schema")
    schema = value.get("json_schema")
    if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
        raise invalid("response_format.json_schema", "must be an object with a name")
    out.type = types_pb2.ResponseFormat.TYPE_JSON_SCHEMA
    out.schema_name = schema["name"]
    out.json_schema = json.dumps(schema.get("schema", {}))
    out.strict = bool(schema.get("strict", False))


def _cache_control(controls: Mapping[str, str]) -> inference_pb2.CacheControl:
    """x-costmesh-cache: comma-separated no-cache / no-store; namespace, tags, max age
    and threshold in headers of their own."""
    flags = {f.strip() for f in controls.get("cache", "").split(",") if f.strip()}
    unknown = sorted(flags - {"no-cache", "no-store"})
    if unknown:
        raise invalid("x-costmesh-cache", f"unknown flag {unknown[0]!r} (no-cache, no-store)")
    control = inference_pb2.CacheControl(
        no_cache="no-cache" in flags,
        no_store="no-store" in flags,
        namespace=controls.get("cache-namespace", ""),
        tags=[t.strip() for t in controls.get("cache-tags", "").split(",") if t.strip()],
    )
    age = controls.get("cache-max-age", "")
    if age:
        if not (age.isascii() and age.isdigit() and int(age) < 2**63):
            raise invalid("x-costmesh-cache-max-age", "must be whole seconds")
        control.max_age_seconds = int(age)
    threshold = controls.get("cache-threshold", "")
    if threshold:
        try:
            control.similarity_threshold = float(threshold)
        except ValueError:
            raise invalid("x-costmesh-cache-threshold", "must be a number") from None
    return control


def _arm(value: str) -> types_pb2.Arm.ValueType:
    if value not in _ARMS:
        raise invalid("x-costmesh-arm", "must be treatment or control")
    return _ARMS[value]


def completion_id(reply: inference_pb2.CompleteResponse) -> str:
    return f"chatcmpl-{reply.request_id}"


def usage(reply: inference_pb2.CompleteResponse) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.usage.input_tokens,
        "completion_tokens": reply.usage.output_tokens,
        "total_tokens": reply.usage.input_tokens + reply.usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": reply.usage.cached_input_tokens},
    }


def completion(reply: inference_pb2.CompleteResponse, created: int) -> dict[str, Any]:
    return {
        "id": completion_id(reply),
        "object": "chat.completion",
        "created": created,
        "model": reply.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content, "refusal": None},
                "finish_reason": reply.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": usage(reply),
        "system_fingerprint": None,
    }


def chunk(
    call_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    return {
        "id": call_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def costmesh_fields(reply: inference_pb2.CompleteResponse) -> dict[str, str]:
    """What the mesh adds to an answer, as x-costmesh-* response headers."""
    fields = {
        "request-id": reply.request_id,
        "cached": "true" if reply.cached else "false",
        "cache-outcome": _OUTCOMES.get(reply.cache_outcome, "unspecified"),
        "cost-nano-usd": str(reply.cost_nano_usd),
        "trace-id": reply.trace_id,
        "tier": _TIERS.get(reply.tier, "unspecified"),
        "provider": reply.provider,
    }
    if reply.cache_entry_id:
        fields["cache-entry-id"] = reply.cache_entry_id
    if reply.escalated:
        fields["escalated-from"] = reply.escalated_from
    if reply.cost_pending:
        fields["cost-pending"] = "true"
    return fields


def now() -> int:
    return int(time.time())
