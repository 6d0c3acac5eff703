"""The simulator's Files and Batch APIs, shaped like OpenAI's.

Uploaded files are kept in memory. A batch is validated when it is created and then
stays `in_progress` until a test moves it: `run` answers its lines (all of them, or
some), `expire` ends it as the 24-hour window would, and the API's cancel ends it
too. Each line is answered like a normal chat completion; a line the API would
refuse (an invalid body), or one a test told to fail, gets a line in the error file.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from costmesh_simulator.wire import CHAT_PATH, ApiError, parse_json, parse_multipart

# Answers one request body like the chat endpoint would, or raises ApiError.
Answer = Callable[[dict[str, Any]], dict[str, Any]]
# A JSON object, or a file's raw bytes.
Reply = dict[str, Any] | bytes

COMPLETION_WINDOW = "24h"
WINDOW_SECONDS = 86_400
MAX_REQUESTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_METADATA = 16
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
TERMINAL = ("completed", "failed", "expired", "cancelled")
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def _now() -> int:
    return int(time.time())


def _not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, f"No such {kind}: '{ident}'.", param="id", code="not_found")


@dataclass
class _File:
    meta: dict[str, Any]
    data: bytes


@dataclass
class _Line:
    custom_id: str
    body: dict[str, Any]
    answered: bool = False


@dataclass
class _Batch:
    meta: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    lines: list[_Line] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: {"input": 0, "cached": 0, "output": 0})


class BatchStore:
    """Files and batches of one simulator; every method is thread-safe."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._lock = threading.Lock()
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}
        self._line_failures: dict[str, tuple[int, str]] = {}
        self._answered: list[dict[str, Any]] = []
        self._auto_seconds: float | None = None

    # --- HTTP --------------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], content_type: str, raw: bytes
    ) -> Reply | None:
        """The reply to a Files or Batch API request; None when the path is neither."""
        parts = path.removeprefix("/v1/").split("/")
        if parts[0] == "files":
            return self._files_api(method, parts[1:], content_type, raw)
        if parts[0] == "batches":
            return self._batches_api(method, parts[1:], query, raw)
        return None

    def _files_api(
        self, method: str, rest: list[str], content_type: str, raw: bytes
    ) -> Reply | None:
        if method == "POST" and not rest:
            return self.upload(parse_multipart(content_type, raw))
        if method == "GET" and len(rest) == 1:
            return self.file(rest[0])
        if method == "GET" and len(rest) == 2 and rest[1] == "content":
            return self.content(rest[0])
        if method == "DELETE" and len(rest) == 1:
            return self.delete_file(rest[0])
        return None

    def _batches_api(
        self, method: str, rest: list[str], query: dict[str, list[str]], raw: bytes
    ) -> Reply | None:
        if method == "POST" and not rest:
            return self.create(parse_json(raw))
        if method == "GET" and not rest:
            limit = _query_int(query, "limit", 20)
            return self.list_batches(query.get("after", [""])[0], limit)
        if method == "GET" and len(rest) == 1:
            return self.retrieve(rest[0])
        if method == "POST" and len(rest) == 2 and rest[1] == "cancel":
            return self.cancel(rest[0])
        return None

    # --- Files API -----------------------------------------------------------------

    def upload(self, fields: dict[str, tuple[str | None, bytes]]) -> dict[str, Any]:
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if purpose not in FILE_PURPOSES:
            message = f"'{purpose}' is not one of {list(FILE_PURPOSES)} - 'purpose'"
            raise ApiError(400, message, param="purpose")
        filename, data = fields.get("file", (None, None))
        if data is None or filename is None:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file")
        if len(data) > MAX_FILE_BYTES:
            raise ApiError(400, f"File is larger than {MAX_FILE_BYTES} bytes.", param="file")
        if purpose == "batch" and not filename.endswith(".jsonl"):
            message = "Invalid file format for Batch API. Must be .jsonl"
            raise ApiError(400, message, param="file")
        with self._lock:
            return copy.deepcopy(self._add_file(filename, purpose, data).meta)

    def _add_file(self, filename: str, purpose: str, data: bytes) -> _File:
        """Keep a file; the caller holds the lock."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": _now(),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self._files[file_id] = stored = _File(meta, data)
        return stored

    def file(self, file_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._file(file_id).meta)

    def content(self, file_id: str) -> bytes:
        with self._lock:
            return self._file(file_id).data

    def delete_file(self, file_id: str) -> dict[str, Any]:
        with self._lock:
            self._file(file_id)
            del self._files[file_id]
        return {"id": file_id, "object": "file", "deleted": True}

    def _file(self, file_id: str) -> _File:
        stored = self._files.get(file_id)
        if stored is None:
            raise _not_found("File object", file_id)
        return stored

    # --- Batch API -----------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        input_file_id = body.get("input_file_id")
        endpoint, window = body.get("endpoint"), body.get("completion_window")
        metadata = body.get("metadata")
        if endpoint != CHAT_PATH:
            message = f"Invalid value for 'endpoint': {endpoint!r}; the simulator runs {CHAT_PATH}"
            raise ApiError(400, message, param="endpoint")
        if window != COMPLETION_WINDOW:
            message = f"Invalid value for 'completion_window': {window!r}; only '24h' is supported."
            raise ApiError(400, message, param="completion_window")
        if metadata is not None and not _valid_metadata(metadata):
            message = f"'metadata' must map at most {MAX_METADATA} string keys to strings."
            raise ApiError(400, message, param="metadata")
        with self._lock:
            if not isinstance(input_file_id, str) or input_file_id not in self._files:
                raise ApiError(
                    400, f"Invalid 'input_file_id': {input_file_id!r}.", param="input_file_id"
                )
            source = self._files[input_file_id]
            if source.meta["purpose"] != "batch":
                message = "The input file must be uploaded with purpose 'batch'."
                raise ApiError(400, message, param="input_file_id")
            now = _now()
            batch_id = f"batch_{uuid.uuid4().hex[:24]}"
            meta: dict[str, Any] = {
                "id": batch_id,
                "object": "batch",
                "endpoint": endpoint,
                "model": None,
                "errors": None,
                "input_file_id": input_file_id,
                "completion_window": window,
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": now,
                "in_progress_at": None,
                "expires_at": now + WINDOW_SECONDS,
                "finalizing_at": None,
                "completed_at": None,
                "failed_at": None,
                "expired_at": None,
                "cancelling_at": None,
                "cancelled_at": None,
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "usage": None,
                "metadata": metadata,
            }
            created = copy.deepcopy(meta)  # what the API answers: still validating
            batch = _Batch(meta)
            self._batches[batch_id] = batch
            self._validate(batch, source.data, endpoint)
        return created

    def _validate(self, batch: _Batch, data: bytes, endpoint: str) -> None:
        """Read the input file as the API's validation step does: failed, or in progress."""
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        models: set[str] = set()
        for number, text in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                line = _read_line(text, seen, endpoint)
            except _RefusedLineError as refused:
                errors.append(refused.error(number))
                continue
            seen.add(line.custom_id)
            model = line.body.get("model")
            if isinstance(model, str):  # a line without one fails when it runs
                models.add(model)
            batch.lines.append(line)
        if not errors and not batch.lines:
            errors.append(
                _RefusedLineError("empty_file", "The input file has no requests.").error()
            )
        if len(batch.lines) > MAX_REQUESTS:
            message = f"A batch may hold at most {MAX_REQUESTS} requests."
            errors.append(_RefusedLineError("too_many_requests", message).error())
        if len(models) > 1:
            message = "Every request of a batch must use the same model."
            errors.append(_RefusedLineError("mismatched_model", message, "body.model").error())
        meta, now = batch.meta, _now()
        if errors:
            batch.lines = []
            meta.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
            return
        meta.update(status="in_progress", in_progress_at=now, model=min(models, default=None))
        meta["request_counts"]["total"] = len(batch.lines)

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            self._complete_due()
            return copy.deepcopy(self._batch(batch_id).meta)

    def list_batches(self, after: str, limit: int) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise ApiError(400, f"Invalid value for 'limit': {limit}.", param="limit")
        with self._lock:
            self._complete_due()
            newest_first = [b.meta for b in reversed(self._batches.values())]
            if after:
                ids = [meta["id"] for meta in newest_first]
                newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
            page = copy.deepcopy(newest_first[:limit])
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(newest_first) > limit,
        }

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Cancelling answers `cancelling`; the batch is `cancelled` by the next look, with
        the lines answered so far in its output and error files."""
        with self._lock:
            batch = self._batch(batch_id)
            status = batch.meta["status"]
            if status in TERMINAL or status == "cancelling":
                message = f"Cannot cancel a batch with status '{status}'."
                raise ApiError(409, message, code="batch_not_cancellable")
            now = _now()
            batch.meta.update(status="cancelling", cancelling_at=now)
            answer = copy.deepcopy(batch.meta)
            self._finish(batch, "cancelled", cancelled_at=now)
            return answer

    def _batch(self, batch_id: str) -> _Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise _not_found("batch", batch_id)
        return batch

    # --- what tests control ----------------------------------------------------------

    def auto_complete(self, seconds: float | None) -> None:
        with self._lock:
            self._auto_seconds = seconds

    def _complete_due(self) -> None:
        """With auto-completion on, finish the batches that have run long enough; the
        caller holds the lock."""
        if self._auto_seconds is None:
            return
        now = time.monotonic()
        for batch in self._open(None):
            if now - batch.started >= self._auto_seconds:
                self._run_all(batch)

    def _run_all(self, batch: _Batch) -> None:
        for line in batch.lines:
            if not line.answered:
                self._run_line(batch, line)
        batch.meta.update(status="finalizing", finalizing_at=_now())
        self._finish(batch, "completed", completed_at=_now())

    def fail_line(self, custom_id: str, status: int, message: str) -> None:
        with self._lock:
            self._line_failures[custom_id] = (status, message)

    def run(self, batch_id: str | None, lines: int | None) -> int:
        """Answer up to `lines` unanswered lines of each open batch (all when None) and
        finish the batches with none left; the number of batches finished."""
        if lines is not None and lines < 0:
            raise ValueError("lines must be >= 0")
        finished = 0
        with self._lock:
            for batch in self._open(batch_id):
                pending = [line for line in batch.lines if not line.answered]
                for line in pending if lines is None else pending[:lines]:
                    self._run_line(batch, line)
                if all(line.answered for line in batch.lines):
                    self._run_all(batch)
                    finished += 1
        return finished

    def expire(self, batch_id: str | None) -> int:
        """End open batches as the completion window would: unanswered lines are errors."""
        with self._lock:
            batches = list(self._open(batch_id))
            for batch in batches:
                for line in batch.lines:
                    if not line.answered:
                        line.answered = True
                        error = {"code": "batch_expired", "message": EXPIRED_MESSAGE}
                        batch.errors.append(_result_line(line.custom_id, None, error))
                self._finish(batch, "expired", expired_at=_now())
        return len(batches)

    def _open(self, batch_id: str | None) -> list[_Batch]:
        if batch_id is not None:
            batch = self._batch(batch_id)
            return [batch] if batch.meta["status"] == "in_progress" else []
        return [b for b in self._batches.values() if b.meta["status"] == "in_progress"]

    def _run_line(self, batch: _Batch, line: _Line) -> None:
        """Answer one line as the chat endpoint would; the caller holds the lock."""
        line.answered = True
        self._answered.append(copy.deepcopy(line.body))
        counts = batch.meta["request_counts"]
        try:
            forced = self._line_failures.get(line.custom_id)
            if forced is not None:
                raise ApiError(forced[0], forced[1])
            body = self._answer(line.body)
        except ApiError as exc:
            response = {"status_code": exc.status, "request_id": uuid.uuid4().hex,
                        "body": exc.body()}  # fmt: skip
            batch.errors.append(_result_line(line.custom_id, response, None))
            counts["failed"] += 1
            return
        response = {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body}
        batch.outputs.append(_result_line(line.custom_id, response, None))
        counts["completed"] += 1
        usage = body.get("usage") or {}
        batch.usage["input"] += int(usage.get("prompt_tokens", 0))
        batch.usage["output"] += int(usage.get("completion_tokens", 0))
        details = usage.get("prompt_tokens_details") or {}
        batch.usage["cached"] += int(details.get("cached_tokens", 0))

    def _finish(self, batch: _Batch, status: str, **stamps: int) -> None:
        """Write the output and error files and end the batch; the caller holds the lock."""
        meta = batch.meta
        for kind, lines in (("output", batch.outputs), ("error", batch.errors)):
            if lines:
                data = "".join(json.dumps(line) + "\n" for line in lines).encode()
                name = f"{meta['id']}_{kind}.jsonl"
                meta[f"{kind}_file_id"] = self._add_file(name, "batch_output", data).meta["id"]
        meta["request_counts"]["failed"] = len(batch.errors)
        used = batch.usage
        meta["usage"] = {
            "input_tokens": used["input"],
            "input_tokens_details": {"cached_tokens": used["cached"]},
            "output_tokens": used["output"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": used["input"] + used["output"],
        }
        meta.update(status=status, **stamps)

    # --- what tests read -------------------------------------------------------------

    def batches(self) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(b.meta) for b in self._batches.values()]

    def files(self) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(f.meta) for f in self._files.values()]

    def answered(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._answered)

    def reset(self) -> None:
        """Forget the line failures tests asked for (files and batches stay)."""
        with self._lock:
            self._line_failures.clear()
            self._answered.clear()


def _result_line(
    custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None
) -> dict[str, Any]:
    """One line of an output or error file, in the Batch API's shape."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


@dataclass(eq=False)  # exceptions must stay hashable
class _RefusedLineError(Exception):
    """Why validation refuses an input file, as an entry of the batch's `errors`."""

    code: str
    message: str
    param: str | None = None

    def error(self, line: int | None = None) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": line}


def _read_line(text: str, seen: set[str], endpoint: str) -> _Line:
    """One input line, or _RefusedLineError saying why validation refuses it."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError:
        raise _RefusedLineError("invalid_json_line", "This line is not valid JSON.") from None
    if not isinstance(item, dict):
        raise _RefusedLineError("invalid_json_line", "Each line must be a JSON object.")
    custom_id, body = item.get("custom_id"), item.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        message = "Missing required parameter: 'custom_id'."
        raise _RefusedLineError("missing_required_parameter", message, "custom_id")
    if custom_id in seen:
        message = f"The custom_id '{custom_id}' is used more than once in this file."
        raise _RefusedLineError("duplicate_custom_id", message, "custom_id")
    if item.get("method") != "POST":
        raise _RefusedLineError(
            "invalid_method", "Only 'POST' is supported for 'method'.", "method"
        )
    if item.get("url") != endpoint:
        message = f"The url {item.get('url')!r} does not match the batch's endpoint {endpoint}."
        raise _RefusedLineError("mismatched_endpoint", message, "url")
    if not isinstance(body, dict):
        raise _RefusedLineError("invalid_body", "'body' must be a JSON object.", "body")
    return _Line(custom_id, body)


def _valid_metadata(metadata: object) -> bool:
    return (
        isinstance(metadata, dict)
        and len(metadata) <= MAX_METADATA
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    )


def _query_int(query: dict[str, list[str]], name: str, default: int) -> int:
    values = query.get(name)
    if not values:
        return default
    try:
        return int(values[0])
    except ValueError:
        raise ApiError(400, f"Invalid value for '{name}': {values[0]!r}.", param=name) from None
