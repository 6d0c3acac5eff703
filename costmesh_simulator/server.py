"""OpenAI-compatible HTTP server on http.server: the labelled simulated provider and test fake.

It speaks chat completions (plain and streamed), embeddings, the model list, and the
Files and Batch APIs (simulator_batches). Tests steer it: scripted answers, latency,
queued or random failures, dropped connections, and batches that finish on request.
By default answers are instant placeholders; realistic=True (simulator_realism) gives
model-like answers, token counts and latencies, still labelled simulated.
"""

from __future__ import annotations

import base64
import copy
import hmac
import json
import math
import random
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from costmesh_simulator.batches import BatchStore, Reply
from costmesh_simulator.knowledge import Knowledge
from costmesh_simulator.realism import ChatReply, Timing, configure
from costmesh_simulator.wire import (
    CHAT_PATH,
    DEFAULT_DIMENSIONS,
    EMBEDDINGS_PATH,
    MAX_DIMENSIONS,
    ApiError,
    Prompt,
    count_tokens,
    default_answer,
    embed,
    logprob_options,
    logprobs_body,
    models_list,
    non_empty_str,
    parse_json,
    positive_int,
    read_messages,
    require_model,
    split_tokens,
    stream_chunks,
    token_logprobs,
    truncate,
)

__all__ = ["OpenAISimulator", "count_tokens"]


class _Server(ThreadingHTTPServer):
    """Threading server that knows its simulator, so handlers need no globals."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], sim: OpenAISimulator) -> None:
        super().__init__(address, _Handler)
        self.sim = sim


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the simulator; HTTP/1.1 with exact framing so httpx keep-alive works."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes: without TCP_NODELAY, Nagle's
    # algorithm and the client's delayed ACK hold each response back about 40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Stay silent: the simulator must not spam service or test output with access logs."""

    def do_GET(self) -> None:
        """Serve the model list."""
        self._dispatch("GET")

    def do_POST(self) -> None:
        """Serve chat completions, embeddings, uploads, batch creation and cancellation."""
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        """Delete an uploaded file."""
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        sim = self.server.sim
        try:
            try:
                # Drain first so an early error still leaves the connection reusable.
                raw = self._read_body()
                sim._arrived()
                sim._wait_latency()
                sim._check_auth(self.headers.get("Authorization"))
                url = urlsplit(self.path)
                path = url.path.rstrip("/")
                if method == "POST" and path in (CHAT_PATH, EMBEDDINGS_PATH):
                    self._inference(path, raw)
                    return
                if (method, path) == ("GET", "/v1/models"):
                    self._send_json(200, models_list())
                    return
                content_type = self.headers.get("Content-Type") or ""
                reply = sim._batch_store.handle(
                    method, path, parse_qs(url.query), content_type, raw
                )
                if reply is None:
                    message = f"Unknown request URL: {method} {path}."
                    raise ApiError(404, message, code="unknown_url")
                if sim._take_lost(path):
                    self.close_connection = True  # done, but the answer never leaves
                    return
                self._send_reply(reply)
            except ApiError as exc:
                self._send_json(exc.status, exc.body(), exc.headers)
        except ConnectionError:
            self.close_connection = True  # the client already gave up (e.g. its timeout fired)

    def _inference(self, path: str, raw: bytes) -> None:
        """A chat completion or embeddings request, unless a test made it fail or drop."""
        sim = self.server.sim
        started = time.monotonic()  # a realistic simulator's latency counts from here
        body = parse_json(raw)
        chat = path == CHAT_PATH
        if chat:
            sim._record(body, self.headers.get("traceparent", ""))
        if sim._take_drop():
            # No response at all: the client sees the connection close under it.
            self.close_connection = True
            return
        sim._maybe_fail(body, chat)
        if not chat:
            embeddings = sim._embeddings(body)
            sim._sleep_until(started + sim._embedding_seconds(embeddings))
            self._send_json(200, embeddings)
            return
        response, timing, pieces = sim._complete(body)
        if body.get("stream") is True:
            options = body.get("stream_options")
            usage = isinstance(options, dict) and options.get("include_usage") is True
            chunks = stream_chunks(response, usage, pieces)
            if timing is None:
                self._send_stream(chunks, [], {})
            else:
                due = _schedule(started, timing, len(pieces or ()))
                self._send_stream(chunks, due, _processing(timing.first_token))
        elif timing is None:
            self._send_json(200, response)
        else:
            sim._sleep_until(started + timing.total)
            self._send_json(200, response, _processing(timing.total))

    def _read_body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").strip().lower() == "chunked":
            return self._read_chunked()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            # Unknown framing: nothing after this point on the socket can be trusted.
            self.close_connection = True
            raise ApiError(400, "Invalid Content-Length header.") from None
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        """A body sent with chunked transfer encoding (an upload of unknown length)."""
        chunks = []
        while True:
            size_line = self.rfile.readline(1024)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "Invalid chunked encoding.") from None
            if size == 0:
                break
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the CRLF after each chunk
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields, unused
        return b"".join(chunks)

    def _send_reply(self, reply: Reply) -> None:
        if isinstance(reply, dict):
            self._send_json(200, reply)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def _send_json(
        self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(
        self, chunks: Iterator[dict[str, Any]], due: list[float], headers: dict[str, str]
    ) -> None:
        """Frame SSE with chunked encoding so the connection survives for keep-alive reuse;
        event i leaves no earlier than due[i] (time.monotonic), when there is one."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        events = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
        sim = self.server.sim
        try:
            for number, event in enumerate(events):
                if number > 1:  # after the role chunk and the first text
                    sim._pause_between_chunks()
                if number < len(due):
                    sim._sleep_until(due[number])
                data = event.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            sim._stream_cut()
            raise


def _schedule(started: float, timing: Timing, pieces: int) -> list[float]:
    """When each stream event is due: the role chunk with the first token, then the answer's
    pieces evenly until the last is out when a plain answer would be."""
    step = timing.generation / pieces if pieces else 0.0
    first = started + timing.first_token
    return [first] + [first + step * (number + 1) for number in range(pieces)]


def _processing(seconds: float) -> dict[str, str]:
    """OpenAI's header for the time the model took (to the first token, when streamed)."""
    return {"openai-processing-ms": str(round(seconds * 1000))}


class OpenAISimulator:
    """Loopback OpenAI look-alike so the mesh and its tests run without a real key or network."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        *,
        realistic: bool = False,
        latency_scale: float = 1.0,
        knowledge: Knowledge | str | Path | None = None,
        seed: int = 0,
        model_tiers: Mapping[str, str] | None = None,
        keep_requests: bool = True,
    ) -> None:
        """keep_requests=False keeps no request bodies (`requests` stays empty): for a
        long-running stand-in, whose memory must not grow with every call.
        realistic=True answers like a model would (simulator_realism): latencies times
        `latency_scale` (0: instant), a `knowledge` file's reference answers, wrong ones
        from models whose tier (`model_tiers`, else gpt-4o's) is not complex, all seeded.
        ValueError names a wrong argument (and a knowledge file's bad line)."""
        self._realism = configure(
            realistic=realistic,
            latency_scale=latency_scale,
            knowledge=knowledge,
            seed=seed,
            model_tiers=model_tiers,
        )
        self._host, self._port, self._api_key = host, port, api_key
        self._lock = threading.Lock()
        self._arrival = threading.Condition(self._lock)
        self._arrivals = 0
        self._cut_streams = 0
        self._chunk_delay = 0.0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # Queued failures: status, Retry-After, message, and the model they are for.
        self._failures: deque[tuple[int, float | None, str, str | None]] = deque()
        self._drops = 0
        self._lost: dict[str, int] = {}
        self._failure_rate = 0.0
        self._failure_statuses: tuple[int, ...] = ()
        self._failure_random = random.Random(0)
        self._latency = 0.0
        self._report_usage = True
        self._requests: list[dict[str, Any]] = []
        self._traceparents: list[str] = []  # each chat request's W3C traceparent, "" if none
        self._keep_requests = keep_requests
        self._call_count = 0
        self._scripts: dict[str, tuple[str, float | None]] = {}
        self._batch_store = BatchStore(self._answer)

    def start(self) -> str:
        """Bind and serve in a daemon thread; binding here lets port=0 pick a free port."""
        if self._server is None:
            self._stopping.clear()
            self._server = _Server((self._host, self._port), self)
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="openai-simulator",
                daemon=True,
            )
            self._thread.start()
        return self.base_url

    def stop(self) -> None:
        """Shut down and join; safe to call repeatedly."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes handlers parked in simulated latency
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """The URL to hand to the SDK; only known once bound."""
        if self._server is None:
            raise RuntimeError("OpenAISimulator is not running; call start() first")
        return f"http://{self._host}:{self._server.server_address[1]}/v1"

    def fail_next(
        self,
        count: int,
        status: int = 500,
        retry_after: float | None = None,
        message: str = "simulated failure",
        model: str | None = None,
    ) -> None:
        """Queue provider failures for the next chat/embedding requests (calls accumulate);
        with `model`, only requests for that model take them, in queue order."""
        if count < 0 or not 400 <= status <= 599:
            raise ValueError("count must be >= 0 and status an HTTP error code (400-599)")
        with self._lock:
            self._failures.extend([(status, retry_after, message, model)] * count)

    def set_failure_rate(
        self, rate: float, statuses: tuple[int, ...] = (500, 429), seed: int = 0
    ) -> None:
        """Fail this share of chat requests at random, each with one of `statuses`.

        The draws come from a generator seeded with `seed`, so the same sequence of
        requests fails the same way every run; queued failures (fail_next) go first and
        draw nothing. A rate of 0 turns it off.
        """
        if not 0 <= rate <= 1 or not statuses or any(not 400 <= s <= 599 for s in statuses):
            raise ValueError("rate must be in [0, 1] and statuses HTTP error codes (400-599)")
        with self._lock:
            self._failure_rate = rate
            self._failure_statuses = tuple(statuses)
            self._failure_random = random.Random(seed)

    def drop_next(self, count: int) -> None:
        """Close the connection of the next `count` chat/embedding requests without sending
        any HTTP response (calls accumulate), as a crashed or cut-off server would."""
        if count < 0:
            raise ValueError("count must be >= 0")
        with self._lock:
            self._drops += count

    def lose_next_reply(self, path: str, count: int = 1) -> None:
        """Carry out the next `count` Files/Batch API requests to `path` (such as
        "/v1/batches") but close the connection instead of answering, as when a reply is
        lost in transit: the caller cannot tell whether it happened."""
        if count < 0:
            raise ValueError("count must be >= 0")
        key = path.rstrip("/")
        with self._lock:
            self._lost[key] = self._lost.get(key, 0) + count

    def set_batch_auto_complete(self, seconds: float | None) -> None:
        """Let batches finish on their own once they have been in progress `seconds`
        (checked whenever a batch is looked at), as a demo needs; None, the default, keeps
        them in progress until a test calls complete_batches()."""
        if seconds is not None and seconds < 0:
            raise ValueError("seconds must be >= 0 or None")
        self._batch_store.auto_complete(seconds)

    def complete_batches(self, batch_id: str | None = None) -> int:
        """Answer every line of every in-progress batch (or just `batch_id`) now, writing
        their output and error files; the number of batches completed."""
        return self._batch_store.run(batch_id, None)

    def advance_batches(self, lines: int, batch_id: str | None = None) -> int:
        """Answer up to `lines` more lines of each in-progress batch, leaving it in progress
        unless none are left; the number of batches that completed."""
        return self._batch_store.run(batch_id, lines)

    def expire_batches(self, batch_id: str | None = None) -> int:
        """End in-progress batches as an elapsed 24-hour window does: lines not answered yet
        go to the error file as `batch_expired`; the number of batches expired."""
        return self._batch_store.expire(batch_id)

    def fail_batch_line(
        self, custom_id: str, status: int = 500, message: str = "simulated failure"
    ) -> None:
        """Make the batch line with this custom_id fail (in whatever batch runs it) until
        reset(): it lands in the error file with this HTTP status and message."""
        if not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error code (400-599)")
        self._batch_store.fail_line(custom_id, status, message)

    @property
    def batches(self) -> list[dict[str, Any]]:
        """Copies of every batch object, in creation order, as the API would show them."""
        return self._batch_store.batches()

    @property
    def files(self) -> list[dict[str, Any]]:
        """Copies of every stored file object (uploads and batch outputs)."""
        return self._batch_store.files()

    @property
    def batch_requests(self) -> list[dict[str, Any]]:
        """Copies of the request bodies batch lines were answered for, in answer order."""
        return self._batch_store.answered()

    def set_report_usage(self, enabled: bool) -> None:
        """Omit `usage` from answers, as some OpenAI-compatible servers do."""
        with self._lock:
            self._report_usage = enabled

    def set_latency(self, seconds: float) -> None:
        """Delay every answer, to exercise client timeouts and concurrency."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        with self._lock:
            self._latency = seconds

    def script(self, model: str, content: str, *, token_logprob: float | None = None) -> None:
        """Pin `model`'s answer until reset(), so a test can make one tier weak or confident.

        The content is sent as given (any [CONFIDENCE: N] tag is the caller's), still cut by
        max_tokens; token_logprob, when given, is every token's logprob if logprobs are asked.
        """
        if not model:
            raise ValueError("model must be a non-empty string")
        if token_logprob is not None and not (math.isfinite(token_logprob) and token_logprob <= 0):
            raise ValueError("token_logprob must be a finite number <= 0")
        with self._lock:
            self._scripts[model] = (content, token_logprob)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Deep copies of chat request bodies, in arrival order, for assertions."""
        with self._lock:
            return copy.deepcopy(self._requests)

    @property
    def traceparents(self) -> list[str]:
        """The `traceparent` header of each chat request, in arrival order."""
        with self._lock:
            return list(self._traceparents)

    @property
    def call_count(self) -> int:
        """Chat completions answered successfully (streamed or not)."""
        with self._lock:
            return self._call_count

    def reset(self) -> None:
        """Forget failures (queued, random, drops, lost replies, batch lines), latency,
        scripts, recorded requests and the call count. Uploaded files and batches stay."""
        self._batch_store.reset()
        with self._lock:
            self._failures.clear()
            self._drops = 0
            self._lost.clear()
            self._failure_rate = 0.0
            self._scripts.clear()
            self._latency = 0.0
            self._chunk_delay = 0.0
            self._requests.clear()
            self._traceparents.clear()
            self._call_count = 0
            self._report_usage = True

    def set_stream_chunk_delay(self, seconds: float) -> None:
        """Pause between streamed chunks, so a test can cancel a stream mid-answer."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        with self._lock:
            self._chunk_delay = seconds

    def wait_for_cut_streams(self, count: int, timeout: float) -> bool:
        """Block until `count` streams lost their client before the end."""
        with self._arrival:
            return self._arrival.wait_for(lambda: self._cut_streams >= count, timeout)

    def _pause_between_chunks(self) -> None:
        with self._lock:
            delay = self._chunk_delay
        if delay:
            self._stopping.wait(delay)

    def _stream_cut(self) -> None:
        with self._arrival:
            self._cut_streams += 1
            self._arrival.notify_all()

    def wait_for_arrivals(self, count: int, timeout: float) -> bool:
        """Block until `count` requests have arrived (before any injected latency)."""
        with self._arrival:
            return self._arrival.wait_for(lambda: self._arrivals >= count, timeout)

    def _arrived(self) -> None:
        with self._arrival:
            self._arrivals += 1
            self._arrival.notify_all()

    def _wait_latency(self) -> None:
        with self._lock:
            latency = self._latency
        if latency > 0:
            self._stopping.wait(latency)

    def _check_auth(self, header: str | None) -> None:
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "You didn't provide an API key.", code="invalid_api_key")
        expected = self._api_key
        if expected is not None and not hmac.compare_digest(token.encode(), expected.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _record(self, body: dict[str, Any], traceparent: str) -> None:
        if not self._keep_requests:
            return
        with self._lock:
            self._requests.append(copy.deepcopy(body))
            self._traceparents.append(traceparent)

    def _take_drop(self) -> bool:
        with self._lock:
            if self._drops == 0:
                return False
            self._drops -= 1
            return True

    def _take_lost(self, path: str) -> bool:
        with self._lock:
            if not self._lost.get(path):
                return False
            self._lost[path] -= 1
            return True

    def _maybe_fail(self, body: dict[str, Any], chat: bool) -> None:
        """Raise the failure a test queued for this request, or a random one."""
        model = body.get("model")
        with self._lock:
            failure = None
            for index, queued in enumerate(self._failures):
                if queued[3] is None or queued[3] == model:
                    failure = queued[:3]
                    del self._failures[index]
                    break
            if failure is None and chat and self._failure_rate > 0:
                draw = self._failure_random.random()
                status = self._failure_random.choice(self._failure_statuses)
                if draw < self._failure_rate:
                    failure = (status, None, "simulated failure (random)")
        if failure is not None:
            status, retry_after, message = failure
            headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
            raise ApiError(status, message, headers=headers)

    def _complete(
        self, body: dict[str, Any]
    ) -> tuple[dict[str, Any], Timing | None, list[str] | None]:
        """Answer a chat request and count it; a realistic answer also says when it is due
        and the pieces it streams in."""
        response, reply, prompt = self._reply(body)
        with self._lock:
            self._call_count += 1
        if self._realism is None:
            return response, None, None
        timing = self._realism.chat_timing(
            response["model"], prompt, reply.prompt_tokens, reply.completion_tokens
        )
        return response, timing, reply.pieces

    def _answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat completion for `body` (also a batch line's), or the ApiError the API gives."""
        return self._reply(body)[0]

    def _reply(self, body: dict[str, Any]) -> tuple[dict[str, Any], ChatReply, Prompt]:
        """The completion body, the answer behind it and the prompt it answers."""
        model, prompt = require_model(body), read_messages(body.get("messages"))
        limit = positive_int(body, "max_completion_tokens") or positive_int(body, "max_tokens")
        top_logprobs = logprob_options(body)
        with self._lock:
            report_usage = self._report_usage
            scripted = self._scripts.get(model)
        wants_logprobs = top_logprobs is not None
        if self._realism is not None and scripted is None:
            reply = self._realism.reply(model, prompt, limit, wants_logprobs)
        else:
            reply = _placeholder(model, prompt, limit, wants_logprobs, scripted)
        logprobs = None
        if reply.logprobs is not None and top_logprobs is not None:
            logprobs = logprobs_body(reply.pieces, reply.logprobs, top_logprobs)
        usage = {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        response = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.content},
                    "finish_reason": "length" if reply.truncated else "stop",
                    "logprobs": logprobs,
                }
            ],
            "usage": usage if report_usage else None,
            "system_fingerprint": "simulated",
        }
        return response, reply, prompt

    def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        model, raw_input = require_model(body), body.get("input")
        texts: Any = [raw_input] if isinstance(raw_input, str) else raw_input
        if not isinstance(texts, list) or not texts or not all(non_empty_str(t) for t in texts):
            message = "'input' must be a non-empty string or array of non-empty strings."
            raise ApiError(400, message, param="input")
        dimensions = positive_int(body, "dimensions", MAX_DIMENSIONS) or DEFAULT_DIMENSIONS
        # The SDK asks for base64 unless the caller chose a format, then decodes it itself.
        as_base64 = body.get("encoding_format") == "base64"
        data: list[dict[str, Any]] = []
        for index, text in enumerate(texts):
            vector = embed(text, dimensions)
            encoded: Any = vector
            if as_base64:
                encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        realism = self._realism
        tokens = sum(realism.count(model, t) if realism else count_tokens(t) for t in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": model, "usage": usage}

    def _embedding_seconds(self, response: dict[str, Any]) -> float:
        """How long a realistic provider takes over these embeddings; 0 by default."""
        if self._realism is None:
            return 0.0
        return self._realism.embedding_seconds(response["usage"]["prompt_tokens"])

    def _sleep_until(self, deadline: float) -> None:
        """The realistic simulator's latency; stop() cuts it short."""
        remaining = deadline - time.monotonic()
        if remaining > 0:
            self._stopping.wait(remaining)


def _placeholder(
    model: str,
    prompt: Prompt,
    limit: int | None,
    wants_logprobs: bool,
    scripted: tuple[str, float | None] | None,
) -> ChatReply:
    """The default answer (a test's script, else an echo) with its regex-counted usage."""
    content, fixed_logprob = scripted or (default_answer(model, prompt), None)
    answer, truncated = truncate(content, limit)
    pieces, logprobs = split_tokens(answer), None
    if wants_logprobs:
        logprobs = token_logprobs(model, prompt.last_user, len(pieces), fixed_logprob)
    return ChatReply(answer, truncated, prompt.tokens, count_tokens(answer), pieces, logprobs)
