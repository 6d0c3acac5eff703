"""The OpenAI wire format as the simulator speaks it: parsing requests, counting tokens,
building chat, stream and embedding bodies. Pure functions, no server."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from itertools import pairwise
from typing import Any

from services.inference.escalation import CONFIDENCE_INSTRUCTION

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
DEFAULT_DIMENSIONS = 64
MAX_DIMENSIONS = 4096
_MODELS = ("gpt-4o", "gpt-4o-mini")
CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
FILES_PATH = "/v1/files"
BATCHES_PATH = "/v1/batches"
# Prompt markers inference uses to ask for a self-rating and for a complexity label.
CONFIDENCE_MARKER = "[CONFIDENCE: N]"
# How inference asks for the rating: appended to the last user message.
RATING_SUFFIX = "\n\n" + CONFIDENCE_INSTRUCTION
CLASSIFY_MARKER = "Reply with one word: simple, moderate or complex"
MAX_TOP_LOGPROBS = 20
_LOGPROB_RANGE = (-1.5, -0.01)
_LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token it considers impossible
_SYSTEM_ROLES = ("system", "developer")
# Stand-ins offered as top_logprobs alternatives; more than MAX_TOP_LOGPROBS so that
# skipping the answer's own token still leaves enough.
_ALTERNATIVES = (
    " the", " a", " and", " of", " to", " in", " is", " it", " that", " for",
    ",", ".", " on", " with", " as", " be", " this", " not", " or", " by", " an",
)  # fmt: skip


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


@dataclass(frozen=True)
class Prompt:
    """What the simulator reads from `messages`: usage, the question and the instructions."""

    tokens: int
    last_user: str
    system: tuple[str, ...]
    # Every message's text, in order, for a realistic simulator's own token count.
    texts: tuple[str, ...] = ()


def read_messages(messages: object) -> Prompt:
    """Validate `messages` as the real API would and count prompt tokens (4 overhead each)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array.", param="messages")
    tokens, last_user, system, texts = 0, "", [], []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        text = content_text(message.get("content")) if isinstance(message, dict) else None
        if not non_empty_str(role) or text is None:
            raise ApiError(400, f"Invalid message at messages[{i}].", param=f"messages[{i}]")
        tokens += count_tokens(text) + 4
        texts.append(text)
        if role == "user":
            last_user = text.removesuffix(RATING_SUFFIX)
            if last_user != text:
                system.append(CONFIDENCE_INSTRUCTION)
        elif role in _SYSTEM_ROLES:
            system.append(text)
    return Prompt(tokens, last_user, tuple(system), tuple(texts))


def unit(text: str) -> float:
    """Map text to [0, 1) through sha256, so simulated numbers repeat across runs and hosts."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def self_rating(model: str, last_user: str) -> int:
    """The simulated [CONFIDENCE: k], k in 4..10, from sha256(model + last user message)."""
    return 4 + int(unit(model + last_user) * 7)


def classify(last_user: str) -> str:
    """Simulated router label by length alone: a stand-in for an LLM classifier, not one."""
    if len(last_user) < 60:
        return "simple"
    return "moderate" if len(last_user) < 140 else "complex"


def default_answer(model: str, prompt: Prompt) -> str:
    """The unscripted answer: a classifier label when asked for one, else an echo, self-rated
    when the instructions ask for [CONFIDENCE: N]."""
    if any(CLASSIFY_MARKER in text for text in prompt.system):
        return classify(prompt.last_user)
    answer = f"[simulated] Answer to: {prompt.last_user}"
    if any(CONFIDENCE_MARKER in text for text in prompt.system):
        answer += f"\n[CONFIDENCE: {self_rating(model, prompt.last_user)}]"
    return answer


def token_logprobs(model: str, last_user: str, count: int, fixed: float | None) -> list[float]:
    """One logprob per answer token: `fixed` (a script's), else deterministic per
    (model, last user message, index) in [-1.5, -0.01]."""
    if fixed is not None:
        return [fixed] * count
    low, high = _LOGPROB_RANGE
    return [
        round(low + unit(f"{model}\0{last_user}\0{index}") * (high - low), 6)
        for index in range(count)
    ]


def logprob_options(body: dict[str, Any]) -> int | None:
    """None when logprobs are off, else top_logprobs (0 by default); rejects what OpenAI does."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        message = f"Invalid type for 'logprobs': expected a boolean, but got {logprobs!r}."
        raise ApiError(400, message, param="logprobs")
    if top is None:
        return 0 if logprobs else None
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        message = f"Invalid value for 'top_logprobs': {top!r}. Expected an integer from 0 to 20."
        raise ApiError(400, message, param="top_logprobs")
    if not logprobs:
        message = "Invalid value for 'top_logprobs': 'logprobs' must be true to use top_logprobs."
        raise ApiError(400, message, param="top_logprobs")
    return top


def split_tokens(text: str) -> list[str]:
    """Cut text at each counted token's start: count_tokens(text) pieces that join back to text
    (leading and trailing whitespace ride on the neighbouring token)."""
    starts = [match.start() for match in _TOKEN_RE.finditer(text)]
    if not starts:
        return []
    return [text[a:b] for a, b in pairwise([0, *starts[1:], len(text)])]


def _alternatives(token: str, logprob: float, count: int) -> list[dict[str, Any]]:
    """`count` candidates, the chosen token first, each less likely than the last and the
    total probability at most 1, so consumers computing margins or entropy see sane numbers."""
    if count == 0:
        return []
    chosen = math.exp(logprob)
    mass = min(chosen, 1.0 - chosen)
    out = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
    others = (alt for alt in _ALTERNATIVES if alt != token)
    for rank, alt in zip(range(1, count), others, strict=False):
        value = math.log(mass / 2**rank) if mass > 0 else _LOGPROB_FLOOR
        alt_logprob = max(value, _LOGPROB_FLOOR)
        out.append({"token": alt, "logprob": alt_logprob, "bytes": list(alt.encode())})
    return out


def logprobs_body(tokens: list[str], logprobs: list[float], top: int) -> dict[str, Any]:
    """choices[0].logprobs in OpenAI's shape."""
    content = [
        {
            "token": token,
            "logprob": logprob,
            "bytes": list(token.encode()),
            "top_logprobs": _alternatives(token, logprob, top),
        }
        for token, logprob in zip(tokens, logprobs, strict=True)
    ]
    return {"content": content, "refusal": None}


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


def _logprobs_per_piece(pieces: list[str], entries: list[dict[str, Any]]) -> list[Any]:
    """Hand each streamed piece the logprob entries whose tokens spell it; pieces start where a
    token starts (see split_tokens), so none is ever split."""
    pending, out = deque(entries), []
    for piece in pieces:
        taken, spelled = [], ""
        while pending and len(spelled) < len(piece):
            taken.append(pending.popleft())
            spelled += taken[-1]["token"]
        out.append({"content": taken, "refusal": None})
    return out


def stream_chunks(
    response: dict[str, Any], include_usage: bool, pieces: list[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Replay a finished completion as chunks so streamed and plain answers can never diverge.

    The answer goes out word by word, or as `pieces` (which must spell it and start where
    its logprob tokens start) when given.
    """
    base = {key: response[key] for key in ("id", "created", "model", "system_fingerprint")}
    base["object"] = "chat.completion.chunk"
    answer = response["choices"][0]

    def chunk(
        delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        out = {**base, "choices": [choice]}
        # OpenAI sends an explicit null usage on every chunk once usage was requested.
        if include_usage:
            out["usage"] = None
        return out

    yield chunk({"role": "assistant", "content": ""})
    if pieces is None:
        pieces = re.findall(r"\s*\S+\s*", answer["message"]["content"])
    logprobs: list[Any] = [None] * len(pieces)
    if answer["logprobs"] is not None:
        logprobs = _logprobs_per_piece(pieces, answer["logprobs"]["content"])
    for piece, piece_logprobs in zip(pieces, logprobs, strict=True):
        yield chunk({"content": piece}, logprobs=piece_logprobs)
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


def parse_multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename, bytes), bytes exact.

    Parsed by hand (not with the email package, which may rewrite line endings), so an
    uploaded file comes back byte for byte.
    """
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise ApiError(400, "Expected a multipart/form-data body with a boundary.")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in raw.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, separator, body = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not separator:
            raise ApiError(400, "Malformed multipart/form-data body.")
        disposition = Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition["content-disposition"] = value.strip()
        field_name = disposition.get_param("name", header="content-disposition")
        if not isinstance(field_name, str):
            raise ApiError(400, "Every multipart/form-data part needs a name.")
        filename = disposition.get_param("filename", header="content-disposition")
        fields[field_name] = (
            filename if isinstance(filename, str) else None,
            body.removesuffix(b"\r\n"),
        )
    return fields
