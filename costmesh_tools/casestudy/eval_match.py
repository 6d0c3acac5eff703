"""The quality gate's reference-match scorer: does a free-text answer say what the
reference says, or what another intent's reference says?

Cosine similarity to the reference alone separates right from wrong poorly: two right
answers to one intent, worded apart, are often less alike than a right answer and the
answer to a neighbouring intent (cancel an order, change an order). So an answer is held
against all of its feature's references, grouped by label (the intent): it is right (1)
when the group it is closest to, by the mean of the group's embeddings, is its own
request's label, and at least `MATCH_FLOOR` close, so that a deflection close to nothing
is wrong too; otherwise it is wrong (0). The floor was chosen on Bitext's training split
and is measured on its test split by `bench/eval_scorer.py` (figures in bench/NOTES.md).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np
import numpy.typing as npt

from costmesh_tools.casestudy.evaluate import Pair
from costmesh_tools.casestudy.workload import WorkloadRequest

MATCH_FLOOR = 0.5

Vectors = npt.NDArray[np.float32]


def match_features(requests: Sequence[WorkloadRequest]) -> set[str]:
    """Features a match can judge: every request with a reference is labelled, and the
    references carry at least two labels."""
    labels: dict[str, set[str | None]] = {}
    for request in requests:
        if request.reference:
            labels.setdefault(request.feature, set()).add(request.label)
    return {f for f, found in labels.items() if None not in found and len(found) >= 2}


class MatchScorer:
    """Scores answers 1 or 0 by the label of the references they are closest to."""

    name = "match"

    def __init__(
        self, embed: Callable[[Sequence[str]], Vectors], floor: float = MATCH_FLOOR
    ) -> None:
        self._embed = embed  # unit-length rows, one per text
        self.floor = floor

    def score(self, pairs: Sequence[Pair], features: Collection[str]) -> None:
        """Scores (in place) the answers given to labelled requests of `features`; an
        empty answer is wrong."""
        chosen = [
            p for p in pairs
            if p.request.feature in features and p.request.reference and p.request.label
        ]  # fmt: skip
        answers = [(p, a) for p in chosen for a in p.answers if not a.error]
        texts = sorted({*(p.request.reference or "" for p in chosen),
                        *(a.content for _, a in answers)} - {""})  # fmt: skip
        if not texts:
            return
        row = {text: i for i, text in enumerate(texts)}
        vectors = self._embed(texts)
        keys = {f: _key(vectors, row, [p.request for p in chosen if p.request.feature == f])
                for f in {p.request.feature for p in chosen}}  # fmt: skip
        for pair, answer in answers:
            if not answer.content:
                answer.score = 0.0
                continue
            labels, centroids = keys[pair.request.feature]
            closeness = centroids @ vectors[row[answer.content]]
            own = labels.index(pair.request.label or "")
            right = int(np.argmax(closeness)) == own and closeness[own] >= self.floor
            answer.score = float(right)


def _key(
    vectors: Vectors, row: dict[str, int], requests: Sequence[WorkloadRequest]
) -> tuple[list[str], Vectors]:
    """The feature's labels and, for each, the unit mean of its distinct references."""
    references: dict[str, set[str]] = {}
    for request in requests:
        references.setdefault(request.label or "", set()).add(request.reference or "")
    labels = sorted(references)
    means = np.stack([vectors[[row[r] for r in sorted(references[label])]].mean(axis=0)
                      for label in labels])  # fmt: skip
    centroids: Vectors = (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
    return labels, centroids
