"""The trained embedding classifier as a versioned file the router loads and reloads.

A multinomial logistic regression over sentence embeddings. Its classes are the
training set's intents when it has them (each mapped to one tier), else the tiers
themselves: on Banking77, summing 77 intent probabilities per tier is 6 points more
accurate than learning the three tiers directly, whose members share little
wording. Probabilities are temperature-scaled on held-out rows so that "0.9" means
right nine times in ten.

It also knows where its training data lies: each class's centroid (the normalised
mean of its training vectors), and the similarity to the nearest centroid below which
a question is out of its domain (chosen so that 2% of held-out in-domain questions
fall below it). A classifier is confidently wrong far from its data; the router sends
such questions to a safe tier instead. Between that bar and a familiar similarity
(where 5% of held-out questions fall below), a question is partly unfamiliar, from 1 at
the bar to 0 at the familiar mark, and needs to be that much surer to go cheaper.

The file is a NumPy `.npz` read with allow_pickle=False: loading an artefact never
runs code. Its version is a digest of its content, so a router reports exactly
which training run decided.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

TIERS = ("simple", "moderate", "complex")
FORMAT = "costmesh-router-artefact/1"
Matrix = npt.NDArray[np.float32]
Probabilities = npt.NDArray[np.float64]


class ArtefactError(ValueError):
    """An artefact that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class TierModel:
    """Class weights, each class's tier, and the calibration temperature."""

    weights: Matrix  # (classes, dimensions)
    bias: Matrix  # (classes,)
    classes: tuple[str, ...]
    class_tiers: tuple[str, ...]
    temperature: float
    embedding_model: str
    # Training facts shown to operators: data, rows, held-out accuracy, and the
    # held-out cheap scores a cheap-share target starts from.
    meta: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    # (classes, dimensions), unit rows; None in artefacts trained before (no detection).
    centroids: Matrix | None = None
    ood_min_similarity: float = 0.0
    # At or above it a question is familiar; 0 in artefacts trained before (no ramp).
    familiar_similarity: float = 0.0

    def __post_init__(self) -> None:
        rows = self.weights.shape[0]
        if self.bias.shape != (rows,) or len(self.classes) != rows:
            raise ArtefactError("weights, bias and classes disagree in length")
        if len(self.class_tiers) != rows or not set(self.class_tiers) <= set(TIERS):
            raise ArtefactError(f"every class needs a tier among {', '.join(TIERS)}")
        if not self.temperature > 0:
            raise ArtefactError("temperature must be positive")
        if self.centroids is not None and self.centroids.shape != self.weights.shape:
            raise ArtefactError("centroids and weights disagree in shape")
        if self.familiar_similarity and self.familiar_similarity < self.ood_min_similarity:
            raise ArtefactError("the familiar similarity is below the out-of-domain bar")

    @property
    def dimensions(self) -> int:
        return int(self.weights.shape[1])

    def class_probabilities(self, vectors: Matrix) -> Probabilities:
        """Calibrated probability of each class, one row per vector (float64: summed
        float32 probabilities can exceed 1, which the ledger rightly refuses)."""
        logits = (vectors.astype(np.float64) @ self.weights.T + self.bias) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        probabilities: Probabilities = exp / exp.sum(axis=1, keepdims=True)
        return probabilities

    def nearest_similarity(self, vectors: Matrix) -> npt.NDArray[np.float64] | None:
        """Cosine similarity of each (unit) vector to the nearest class centroid; None
        when the artefact has no centroids."""
        if self.centroids is None:
            return None
        similarities: npt.NDArray[np.float64] = (
            vectors.astype(np.float64) @ self.centroids.T.astype(np.float64)
        ).max(axis=1)
        return similarities

    def unfamiliarity(self, vectors: Matrix) -> npt.NDArray[np.float64]:
        """How far each vector lies toward the edge of the training data, in [0, 1]: 1
        out of domain, 0 from the familiar similarity up, linear in between."""
        nearest = self.nearest_similarity(vectors)
        if nearest is None:
            return np.zeros(len(vectors), dtype=np.float64)
        return self.unfamiliarity_at(nearest)

    def unfamiliarity_at(self, nearest: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The unfamiliarity of questions at these nearest-centroid similarities."""
        return unfamiliarity(nearest, self.ood_min_similarity, self.familiar_similarity)

    def tier_probabilities(self, vectors: Matrix) -> Probabilities:
        """Probability of each tier in TIERS order: the sum over its classes."""
        return tier_sums(self.class_probabilities(vectors), self.class_tiers)

    def save(self, path: Path) -> str:
        """Write atomically (a reloading router never reads half a file); the version."""
        meta = {
            **self.meta,
            "format": FORMAT,
            "classes": list(self.classes),
            "class_tiers": list(self.class_tiers),
            "temperature": self.temperature,
            "embedding_model": self.embedding_model,
            "ood_min_similarity": self.ood_min_similarity,
            "familiar_similarity": self.familiar_similarity,
        }
        arrays = {
            "weights": self.weights.astype(np.float32),
            "bias": self.bias.astype(np.float32),
            "meta": np.array(json.dumps(meta, sort_keys=True)),
        }
        if self.centroids is not None:
            arrays["centroids"] = self.centroids.astype(np.float32)
        version = _digest(arrays)
        arrays["version"] = np.array(version)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as tmp:
            tmp.write(buffer.getvalue())
        Path(tmp.name).replace(path)
        return version

    @classmethod
    def load(cls, path: Path) -> TierModel:
        try:
            content = path.read_bytes()  # one read: a file replaced meanwhile is not mixed
        except FileNotFoundError:
            raise ArtefactError(
                f"{path}: no such artefact (train one: costmesh router train)"
            ) from None
        except OSError as exc:
            raise ArtefactError(f"{path}: cannot be read ({exc.strerror})") from None
        try:
            with np.load(io.BytesIO(content), allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except Exception as exc:  # truncated zip, empty file, foreign format: all refused
            raise ArtefactError(f"{path}: not a router artefact ({exc!r})") from None
        missing = {"weights", "bias", "meta", "version"} - set(arrays)
        if missing:
            raise ArtefactError(f"{path}: not a router artefact (no {', '.join(sorted(missing))})")
        version = str(arrays.pop("version"))
        if _digest(arrays) != version:
            raise ArtefactError(f"{path}: content does not match its version {version}")
        try:
            meta = json.loads(str(arrays["meta"]))
        except json.JSONDecodeError:
            raise ArtefactError(f"{path}: its metadata is not JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ArtefactError(f"{path}: format {found!r}, expected {FORMAT}")
        try:
            return cls(
                weights=arrays["weights"].astype(np.float32),
                bias=arrays["bias"].astype(np.float32),
                classes=tuple(meta.pop("classes")),
                class_tiers=tuple(meta.pop("class_tiers")),
                temperature=float(meta.pop("temperature")),
                embedding_model=str(meta.pop("embedding_model")),
                meta=meta,
                version=version,
                centroids=arrays["centroids"].astype(np.float32) if "centroids" in arrays else None,
                ood_min_similarity=float(meta.pop("ood_min_similarity", 0.0)),
                familiar_similarity=float(meta.pop("familiar_similarity", 0.0)),
            )
        except ArtefactError as exc:
            raise ArtefactError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtefactError(f"{path}: incomplete metadata ({exc!r})") from None


def unfamiliarity(
    nearest: npt.NDArray[np.float64], ood_min_similarity: float, familiar_similarity: float
) -> npt.NDArray[np.float64]:
    """1 below the out-of-domain bar, 0 at or above the familiar similarity, linear in
    between (0 everywhere above the bar when there is no familiar similarity)."""
    width = familiar_similarity - ood_min_similarity
    if width > 0:
        ramp = np.clip((familiar_similarity - nearest) / width, 0.0, 1.0)
    else:
        ramp = np.zeros(len(nearest), dtype=np.float64)
    result: npt.NDArray[np.float64] = np.where(nearest < ood_min_similarity, 1.0, ramp)
    return result


def tier_sums(
    class_probabilities: npt.NDArray[np.floating], class_tiers: tuple[str, ...]
) -> Probabilities:
    """Fold per-class probabilities into the three tiers, each within [0, 1]."""
    sums: Probabilities = np.clip(
        class_probabilities.astype(np.float64) @ _fold(class_tiers), 0.0, 1.0
    )
    return sums


@functools.lru_cache(maxsize=16)
def _fold(class_tiers: tuple[str, ...]) -> npt.NDArray[np.float64]:
    """Which tier each class belongs to, as a matrix: built once per artefact."""
    return np.array([[t == tier for tier in TIERS] for t in class_tiers], dtype=np.float64)


def _digest(arrays: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(name.encode())
        digest.update(str(value.dtype).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]
