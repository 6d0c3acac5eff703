"""The OpenAI wire format as the simulator speaks it: parsing requests, counting tokens,
building chat, stream and embedding bodies. Pure functions, no server."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
DEFAULT_DIMENSIONS = 64
MAX_DIMENSIONS = 4096
_MODELS = ("gpt-4o", "gpt-4o-mini")
CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"


def count_tokens(text: str) -> int:
    r"""Deterministic token count: number of regex matches of r"\w+|[^\w\s]"."""
    return sum(1 for _ in _TOKEN_RE.finditer(text))


@dataclass(eq=False)  # exceptions must stay hashable
class ApiError(Exception):
    """Carries an HTTP status and OpenAI error fields to the one place that writes error bodies."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        """Mirror OpenAI's error envelope so the SDK maps it onto its typed exceptions."""
        kind, code = "invalid_request_error", self.code
        if self.status == 429:
            kind, code = "requests", self.code or "rate_limit_exceeded"
        elif self.status >= 500:
            kind = "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}


def content_text(content: object) -> str | None:
    """Flatten string or text-part content; None marks a shape the real API would reject."""
    if isinstance(content, str):
        return content
    if content is None:  # assistant tool-call turns legitimately carry no content
        return ""
    if not isinstance(content, list):
        return None
    texts: list[str] = []
    for part in content:
        if not isinstance(part, dict):
            return None
        if part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                return None
            texts.append(text)
    return " ".join(texts)


def non_empty_str(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model")
    return model


def positive_int(body: dict[str, Any], name: str, upper: int | None = None) -> int | None:
    """Read an optional integer knob, rejecting values the real API would refuse."""
    value = body.get(name)
    if value is None:
        return None
    too_big = upper is not None and isinstance(value, int) and value > upper
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or too_big:
        raise ApiError(400, f"Invalid value for '{name}': {value!r}.", param=name)
    return value


def truncate(text: str, limit: int | None) -> tuple[str, bool]:
    """Cut at the end of the limit-th token so the kept prefix re-tokenises to exactly `limit`."""
    matches = list(_TOKEN_RE.finditer(text))
    if limit is None or len(matches) <= limit:
        return text, False
    return text[: matches[limit - 1].end()], True


def embed(text: str, dimensions: int) -> list[float]:
    """Sum per-token seeded Gaussians so texts sharing tokens point in similar directions."""
    vector = [0.0] * dimensions
    for token in _TOKEN_RE.findall(text.lower()):
        seed = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "big")
        rng = random.Random(seed)
        for i in range(dimensions):
            vector[i] += rng.gauss(0.0, 1.0)
    norm = math.sqrt(sum(v * v for v in vector))
    if norm == 0.0:  # token-free text still needs a valid unit vector
        return [1.0] + [0.0] * (dimensions - 1)
    return [v / norm for v in vector]


def stream_chunks(response: dict[str, Any], include_usage: bool) -> Iterator[dict[str, Any]]:
    """Replay a finished completion as chunks so streamed and plain answers can never diverge."""
    base = {key: response[key] for key in ("id", "created", "model", "system_fingerprint")}
    base["object"] = "chat.completion.chunk"
    answer = response["choices"][0]

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        out = {**base, "choices": [choice]}
        # OpenAI sends an explicit null usage on every chunk once usage was requested.
        if include_usage:
            out["usage"] = None
        return out

    yield chunk({"role": "assistant", "content": ""})
    for piece in re.findall(r"\s*\S+\s*", answer["message"]["content"]):
        yield chunk({"content": piece})
    yield chunk({}, answer["finish_reason"])
    if include_usage:
        yield {**base, "choices": [], "usage": response["usage"]}


def models_list() -> dict[str, Any]:
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "simulator"} for m in _MODELS]
    return {"object": "list", "data": data}


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body
