"""The three ways a feature's requests are classified into tiers.

- `embedding`: the trained artefact over all-MiniLM-L6-v2 embeddings of the question;
  a vector the cache already computed is used instead of embedding again.
- `llm`: a cheap model answers one word; anything else (or a failed call) is
  `complex`, so a classifier outage costs money, never quality.
- `rules`: a fixed tier.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from costmesh.types.v1 import types_pb2
from services.common.embedding import Embedder
from services.common.errors import ServiceError
from services.providers.client import ChatCall, Providers
from services.router.artefact import TIERS, ArtefactError, TierModel, tier_sums

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Classification:
    probabilities: tuple[float, float, float]  # in TIERS order
    version: str
    explanation: str
    usage: types_pb2.TokenUsage | None = None  # billed classification (llm)
    model: str = ""
    failed: bool = False
    embedded: bool = False  # the router embedded the question itself
    out_of_domain: bool = False  # far from the artefact's training data
    unfamiliarity: float = 0.0  # 0..1, toward that edge: raises the cheap-tier bar


class Classifier(Protocol):
    kind: str

    @property
    def version(self) -> str: ...

    async def classify(
        self, question: str, vector: Sequence[float], vector_model: str, time_limit: float
    ) -> Classification: ...


def one_hot(tier: str) -> tuple[float, float, float]:
    return tuple(float(t == tier) for t in TIERS)  # type: ignore[return-value]


class RulesClassifier:
    """A fixed tier, for features that must not be routed."""

    kind = "rules"
    version = "rules"

    def __init__(self, tier: str) -> None:
        self._tier = tier

    async def classify(
        self, question: str, vector: Sequence[float], vector_model: str, time_limit: float
    ) -> Classification:
        return Classification(one_hot(self._tier), self.version, f"fixed tier {self._tier}")


class ArtefactFile:
    """The artefact at `path`, reloaded when the file changes (checked at most every
    `reload_seconds`). A broken replacement is refused and the last good model stays."""

    def __init__(self, path: Path, reload_seconds: float) -> None:
        self.path = path
        self._reload_seconds = reload_seconds
        self._model = TierModel.load(path)
        if self._model.centroids is None:
            log.warning(
                "router artefact %s has no class centroids (trained before out-of-domain "
                "detection): every question is routed by its probabilities; retrain it",
                path,
            )
        self._stamp = self._stat()
        self._checked = time.monotonic()
        self.reload_failures = 0
        log.info("router artefact %s loaded (version %s)", path, self._model.version)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def current(self) -> TierModel:
        now = time.monotonic()
        if now - self._checked < self._reload_seconds:
            return self._model
        self._checked = now
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return self._model
        self._stamp = stamp
        try:
            model = TierModel.load(self.path)
            old = self._model
            if (model.embedding_model, model.dimensions) != (old.embedding_model, old.dimensions):
                raise ArtefactError(
                    f"{self.path}: trained on {model.embedding_model} ({model.dimensions} "
                    f"dimensions), the router embeds with {old.embedding_model}"
                )
        except ArtefactError as exc:
            self.reload_failures += 1
            log.error("router artefact not reloaded, keeping %s: %s", self._model.version, exc)
            return self._model
        log.info(
            "router artefact %s reloaded: %s -> %s", self.path, self._model.version, model.version
        )
        self._model = model
        return model


class EmbeddingClassifier:
    kind = "embedding"

    def __init__(
        self, artefact: ArtefactFile, embedder: Embedder, fallback: Classifier | None = None
    ) -> None:
        self._artefact = artefact  # checked against the embedder's model at start
        self._embedder = embedder
        self._fallback = fallback  # for out-of-domain questions; None: the complex tier

    @property
    def version(self) -> str:
        return self._artefact.current().version

    async def classify(
        self, question: str, vector: Sequence[float], vector_model: str, time_limit: float
    ) -> Classification:
        model = self._artefact.current()
        embedded = not (vector_model == model.embedding_model and len(vector) == model.dimensions)
        if embedded:
            row = (await self._embedder.embed([question])).vectors
        else:
            row = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        nearest = model.nearest_similarity(row)
        if nearest is not None and nearest[0] < model.ood_min_similarity:
            return await self._out_of_domain(
                question, time_limit, model, float(nearest[0]), embedded
            )
        classes = model.class_probabilities(row)[0]
        probabilities = tuple(
            float(p) for p in tier_sums(classes[np.newaxis], model.class_tiers)[0]
        )
        best = int(np.argmax(classes))
        explanation = (
            f"embedding classifier {model.version}: nearest class {model.classes[best]!r} "
            f"({model.class_tiers[best]}, p={classes[best]:.2f})"
        )
        return Classification(
            probabilities,  # type: ignore[arg-type]
            model.version,
            explanation,
            embedded=embedded,
            unfamiliarity=0.0 if nearest is None else float(model.unfamiliarity_at(nearest)[0]),
        )

    async def _out_of_domain(
        self, question: str, time_limit: float, model: TierModel, nearest: float, embedded: bool
    ) -> Classification:
        """Far from every intent the artefact knows: its probabilities would be a
        confident guess. The complex tier, or the fallback classifier's answer."""
        why = (
            f"embedding classifier {model.version}: out of domain (nearest intent at "
            f"similarity {nearest:.2f}, below {model.ood_min_similarity:.2f})"
        )
        if self._fallback is None:
            return Classification(
                one_hot(TIERS[-1]), model.version, f"{why}: the safe tier",
                embedded=embedded, out_of_domain=True,
            )  # fmt: skip
        found = await self._fallback.classify(question, (), "", time_limit)
        return dataclasses.replace(
            found,
            version=model.version,  # the artefact decided to ask; the prompt's is below
            explanation=f"{why}; {found.explanation} (prompt {found.version})",
            embedded=embedded,
            out_of_domain=True,
        )


LLM_PROMPT = (
    "Classify the customer request below by the model it needs.\n"
    "simple: status checks, FAQs, policy and fee look-ups.\n"
    "moderate: how-to questions and multi-step account tasks.\n"
    "complex: disputes, failed or unrecognised transactions, complaints, and "
    "troubleshooting that needs investigation.\n"
    "Reply with one word: simple, moderate or complex."
)
LLM_PROMPT_VERSION = "llm-" + hashlib.sha256(LLM_PROMPT.encode()).hexdigest()[:12]
# The question is cut to this many characters: the classifier needs the gist, and
# a long prompt would cost more than the routing saves.
LLM_MAX_QUESTION = 2000
_WORD = re.compile(r"[a-z]+")


class LLMClassifier:
    """The cheap-LLM classifier of the seed write-up: a tiny prompt, one word out."""

    kind = "llm"
    version = LLM_PROMPT_VERSION

    def __init__(self, providers: Providers, model: str) -> None:
        self._providers = providers
        self._model = model

    async def classify(
        self, question: str, vector: Sequence[float], vector_model: str, time_limit: float
    ) -> Classification:
        messages = [
            types_pb2.ChatMessage(role=types_pb2.ROLE_SYSTEM, content=LLM_PROMPT),
            types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=question[:LLM_MAX_QUESTION]),
        ]
        call = ChatCall(self._model, messages, 10, temperature=0.0, top_p=None, stop=[])
        try:
            completion = await self._providers.chat(call, time_limit)
        except ServiceError as exc:
            return Classification(
                one_hot("complex"),
                self.version,
                f"llm classifier {self._model} failed ({exc.reason}): complex to be safe",
                model=self._model,
                failed=True,
            )
        usage = types_pb2.TokenUsage(
            input_tokens=completion.input_tokens,
            cached_input_tokens=completion.cached_input_tokens,
            output_tokens=completion.output_tokens,
        )
        # "Simple." or "moderate tier" parse; "simple or complex" does not.
        words = _WORD.findall(completion.content.lower())
        named = {w for w in words if w in TIERS}
        tier = words[0] if words and named == {words[0]} else ""
        if not tier:
            shown = completion.content.strip()[:40]
            return Classification(
                one_hot("complex"),
                self.version,
                f"llm classifier {self._model} answered {shown!r}, not a tier: complex",
                usage,
                self._model,
                failed=True,
            )
        return Classification(
            one_hot(tier),
            self.version,
            f"llm classifier {self._model} said {tier}",
            usage,
            self._model,
        )
