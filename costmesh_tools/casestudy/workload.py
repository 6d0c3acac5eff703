"""The workload format: JSONL (optionally gzipped), one recorded request a line.

A replay is only as honest as its input, so a file is checked whole before anything
uses it: every bad line is refused as `path:line: field: why`, ids are unique, and
writing replaces the file in one step so a reader never sees half of it.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from costmesh.types.v1 import types_pb2
from services.router.artefact import TIERS

ROLES = {
    "system": types_pb2.ROLE_SYSTEM,
    "user": types_pb2.ROLE_USER,
    "assistant": types_pb2.ROLE_ASSISTANT,
}
REQUIRED = ("timestamp", "team", "feature", "messages")
OPTIONAL = ("id", "label", "tier", "reference", "max_tokens")
SUFFIXES = (".jsonl", ".jsonl.gz")
# RFC 3339's date-time: fromisoformat alone would also take dates and ISO week forms.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


# max_tokens is an int32 on the wire.
MAX_TOKENS = 2**31 - 1


class WorkloadError(ValueError):
    """Bad workload input or options, said in one line (the CLI exits 2)."""


@dataclass(frozen=True)
class Message:
    role: str  # system, user or assistant
    content: str


@dataclass(frozen=True)
class WorkloadRequest:
    """One recorded request; invalid values are refused as `field: why`."""

    id: str
    timestamp: datetime.datetime
    team: str
    feature: str
    messages: tuple[Message, ...]
    label: str | None = None  # the intent
    tier: str | None = None  # the true complexity
    reference: str | None = None  # a reference answer
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("id", "team", "feature", "label", "reference"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise WorkloadError(f"{name}: must not be empty")
        for name in ("id", "team", "feature", "label", "tier", "reference"):
            _check_utf8(name, getattr(self, name))
        if self.timestamp.utcoffset() is None:
            raise WorkloadError("timestamp: needs a timezone (Z or +hh:mm)")
        _check_messages(self.messages)
        if self.tier is not None and self.tier not in TIERS:
            raise WorkloadError(f"tier: {self.tier!r} is not one of {', '.join(TIERS)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise WorkloadError(f"max_tokens: must be positive, got {self.max_tokens}")
        if self.max_tokens is not None and self.max_tokens > MAX_TOKENS:
            raise WorkloadError(f"max_tokens: must be at most {MAX_TOKENS}, got {self.max_tokens}")

    @property
    def question(self) -> str:
        """The last user message: what a cache compares and a person would call the question."""
        return next(m.content for m in reversed(self.messages) if m.role == "user")


def _check_utf8(name: str, value: str | None) -> None:
    """Text the wire cannot carry (a lone surrogate, say from a JSON escape)."""
    if value is None:
        return
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise WorkloadError(
            f"{name}: not valid Unicode text ({exc.reason} at character {exc.start})"
        ) from None


def _check_messages(messages: tuple[Message, ...]) -> None:
    for i, message in enumerate(messages):
        _check_utf8(f"messages[{i}].role", message.role)
        _check_utf8(f"messages[{i}].content", message.content)
        if message.role not in ROLES:
            raise WorkloadError(
                f"messages[{i}].role: {message.role!r} is not one of {', '.join(ROLES)}"
            )
        if not message.content.strip():
            raise WorkloadError(f"messages[{i}].content: must not be empty")
    if not any(m.role == "user" for m in messages):
        raise WorkloadError("messages: needs at least one user message")


def chat_messages(request: WorkloadRequest) -> list[types_pb2.ChatMessage]:
    """The request's messages as the mesh's wire type."""
    return [types_pb2.ChatMessage(role=ROLES[m.role], content=m.content) for m in request.messages]


def read_workload(path: Path) -> list[WorkloadRequest]:
    """Every request of the file, by timestamp (ties keep file order)."""
    check_suffix(path)
    requests: list[WorkloadRequest] = []
    seen: dict[str, int] = {}
    for line, text in _lines(path):
        if not text.strip():
            continue
        try:
            request = _parse(text, line)
        except WorkloadError as exc:
            raise WorkloadError(f"{path}:{line}: {exc}") from None
        if request.id in seen:
            raise WorkloadError(
                f"{path}:{line}: id: {request.id!r} is already used on line {seen[request.id]}"
            )
        seen[request.id] = line
        requests.append(request)
    if not requests:
        raise WorkloadError(f"{path}: no requests")
    return sorted(requests, key=lambda r: r.timestamp)


def write_workload(path: Path, requests: Iterable[WorkloadRequest]) -> None:
    """Write the requests in the order given; the file is replaced whole or not at all."""
    check_suffix(path)
    seen: dict[str, int] = {}
    lines = []
    for i, request in enumerate(requests):
        if request.id in seen:
            raise WorkloadError(
                f"{path}: requests[{i}].id: {request.id!r} is already used by "
                f"requests[{seen[request.id]}]"
            )
        seen[request.id] = i
        lines.append(json.dumps(_to_json(request), ensure_ascii=False) + "\n")
    data = "".join(lines).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # no timestamp: a rebuild is byte-identical
    try:
        _replace(path, data)
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot be written ({exc.strerror or exc})") from None


def _replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(0o644)  # mkstemp's file is private; the workload is not
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_suffix(path: Path) -> None:
    """Refuse a file name the format does not use, before any work is done for it."""
    if not path.name.endswith(SUFFIXES):
        raise WorkloadError(f"{path}: expected a {' or '.join(SUFFIXES)} file")


def _open(path: Path) -> TextIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with _open(path) as fh:
            yield from enumerate(fh, 1)
    except FileNotFoundError:
        raise WorkloadError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise WorkloadError(f"{path}: not UTF-8 text") from None
    except (OSError, EOFError) as exc:  # unreadable, or a damaged or truncated gzip
        raise WorkloadError(f"{path}: cannot be read ({exc})") from None


def _parse(text: str, line: int) -> WorkloadRequest:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"not JSON: {exc.msg}") from None
    if not isinstance(row, dict):
        raise WorkloadError(f"expected a JSON object, got {_kind(row)}")
    unknown = sorted(set(row) - {*REQUIRED, *OPTIONAL})
    if unknown:
        raise WorkloadError(f"{unknown[0]}: unknown field")
    for name in REQUIRED:
        if name not in row:
            raise WorkloadError(f"{name}: required")
    max_tokens = row.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise WorkloadError(f"max_tokens: expected a whole number, got {_kind(max_tokens)}")
    return WorkloadRequest(
        id=_text(row, "id") if "id" in row else str(line),
        timestamp=_timestamp(_text(row, "timestamp")),
        team=_text(row, "team"),
        feature=_text(row, "feature"),
        messages=_messages(row["messages"]),
        label=_string(row, "label"),
        tier=_string(row, "tier"),
        reference=_string(row, "reference"),
        max_tokens=max_tokens,
    )


def _text(row: dict[str, Any], name: str) -> str:
    value = _string(row, name)
    if value is None:
        raise WorkloadError(f"{name}: expected a string, got null")
    return value


def _string(row: dict[str, Any], name: str) -> str | None:
    value = row.get(name)
    if value is not None and not isinstance(value, str):
        raise WorkloadError(f"{name}: expected a string, got {_kind(value)}")
    return value


def _timestamp(text: str) -> datetime.datetime:
    if not _RFC3339.fullmatch(text):
        raise WorkloadError(f"timestamp: {text!r} is not RFC 3339 with a timezone")
    try:
        return datetime.datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError as exc:
        raise WorkloadError(f"timestamp: {text!r}: {exc}") from None


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise WorkloadError("messages: expected a non-empty list of {role, content}")
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise WorkloadError(f"messages[{i}]: expected an object, got {_kind(item)}")
        unknown = sorted(set(item) - {"role", "content"})
        if unknown:
            raise WorkloadError(f"messages[{i}].{unknown[0]}: unknown field")
        for name in ("role", "content"):
            if not isinstance(item.get(name), str):
                raise WorkloadError(f"messages[{i}].{name}: expected a string")
        messages.append(Message(item["role"], item["content"]))
    return tuple(messages)


def _to_json(request: WorkloadRequest) -> dict[str, Any]:
    utc = request.timestamp.astimezone(datetime.UTC).isoformat()
    row: dict[str, Any] = {
        "id": request.id,
        "timestamp": utc.replace("+00:00", "Z"),
        "team": request.team,
        "feature": request.feature,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "label": request.label,
        "tier": request.tier,
        "reference": request.reference,
        "max_tokens": request.max_tokens,
    }
    return {k: v for k, v in row.items() if v is not None}


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")
