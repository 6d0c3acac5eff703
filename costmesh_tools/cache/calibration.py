"""What a cache serves at a threshold, and the threshold a false-hit budget allows.

Offline and exact: every stored question and query is embedded once, each query's
nearest stored questions are found by brute force, and the guard judges them in
order of similarity, as `SemanticCache` does: the first one it lets through is
served when it clears the threshold. A served hit is false when that question has
another intent (or the query is out of scope). Rates are per what users see: false
hits per served hit, and recall per query that has a right answer in the store.
A query whose exact text is stored is an exact hit at any threshold: it is left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from costmesh_tools.cache.intents import OOS, Example, IntentSet, unique
from services.cache.guard import refusal
from services.common.embedding import embed_sorted

Matrix = npt.NDArray[np.float32]
Embed = Callable[[Sequence[str]], Matrix]
_CHUNK = 1024
TARGETS = (0.005, 0.01, 0.02, 0.05)  # false hits per served hit a model is calibrated for


@dataclass(frozen=True)
class Judged:
    """One query and the stored question the cache would serve at a low enough
    threshold: the nearest the guard lets through, if any."""

    query: Example
    candidate: Example
    similarity: float
    refused: str  # why the guard refused every candidate; "" when one passed

    @property
    def false(self) -> bool:
        return self.query.label == OOS or self.candidate.label != self.query.label


@dataclass(frozen=True)
class Point:
    """What is served at one threshold."""

    threshold: float
    queries: int
    in_scope: int  # queries whose intent has stored questions
    oos_queries: int
    hits: int
    false_hits: int
    oos_hits: int

    @property
    def false_per_hit(self) -> float:
        return self.false_hits / self.hits if self.hits else 0.0

    @property
    def recall(self) -> float:
        return (self.hits - self.false_hits) / self.in_scope if self.in_scope else 0.0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    @property
    def oos_rate(self) -> float:
        return self.oos_hits / self.oos_queries if self.oos_queries else 0.0


def semantic_queries(stored: Sequence[Example], queries: Sequence[Example]) -> list[Example]:
    """The queries a semantic match must answer: those whose text is not stored."""
    texts = {e.text for e in stored}
    return [q for q in queries if q.text not in texts]


def judge(
    embed: Embed, stored: Sequence[Example], queries: Sequence[Example], candidates: int = 4
) -> list[Judged]:
    """What the cache would serve each query (`candidates` as SemanticCache fetches)."""
    matrix = embed_sorted(embed, [e.text for e in stored])
    asked = embed_sorted(embed, [q.text for q in queries])
    k = min(candidates, len(stored))
    judged = []
    for start in range(0, len(queries), _CHUNK):
        scores = asked[start : start + _CHUNK] @ matrix.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        for row, indices in enumerate(top.tolist()):
            query = queries[start + row]
            ranked = sorted(indices, key=lambda i: -scores[row, i])
            judged.append(
                _first_served(query, [(stored[i], float(scores[row, i])) for i in ranked])
            )
    return judged


def _first_served(query: Example, ranked: Sequence[tuple[Example, float]]) -> Judged:
    first_refusal = ""
    for candidate, similarity in ranked:
        why = refusal(query.text, candidate.text)
        if not why:
            return Judged(query, candidate, similarity, "")
        first_refusal = first_refusal or why
    candidate, similarity = ranked[0]
    return Judged(query, candidate, similarity, first_refusal)


def point(judged: Sequence[Judged], threshold: float, stored_labels: set[str]) -> Point:
    served = [j for j in judged if j.similarity >= threshold and not j.refused]
    return Point(
        threshold=threshold,
        queries=len(judged),
        in_scope=sum(j.query.label in stored_labels for j in judged),
        oos_queries=sum(j.query.label == OOS for j in judged),
        hits=len(served),
        false_hits=sum(j.false for j in served),
        oos_hits=sum(j.query.label == OOS for j in served),
    )


def operating_threshold(judged: Sequence[Judged], target: float) -> float:
    """The lowest threshold whose served hits hold at most `target` false ones,
    counting one false hit more than seen (a validation set's luck is not a
    guarantee, and a threshold with fewer than 1/target hits never qualifies).
    1.0 when none does."""
    served = sorted((j for j in judged if not j.refused), key=lambda j: -j.similarity)
    best = 1.0
    falses = 0
    for hits, j in enumerate(served, 1):
        falses += j.false
        last_of_tie = hits == len(served) or served[hits].similarity < j.similarity
        if last_of_tie and (falses + 1) / hits <= target:
            best = j.similarity
    return float(best)


def curve(
    judged: Sequence[Judged], thresholds: Sequence[float], stored_labels: set[str]
) -> list[Point]:
    return [point(judged, t, stored_labels) for t in sorted(thresholds)]


def calibrate(
    embed: Embed, sets: Sequence[IntentSet], targets: Sequence[float] = TARGETS
) -> dict[str, float]:
    """Per false-hit budget, the threshold the validation splits allow together
    (stored: each set's train split; looked up: its validation split), as one mixed
    stream of traffic. The strictest set alone would be Banking77, whose intents
    include pairs worded identically ("Has my top up gone through?" is
    pending_top_up, "Has my top-up gone through?" top_up_reverted): no threshold
    below 1 keeps its false hits under 1%, and the default would serve nothing."""
    judged: list[Judged] = []
    for s in sets:
        stored = unique(s.train)
        judged += judge(embed, stored, semantic_queries(stored, s.validation))
    return {f"{target:g}": round(operating_threshold(judged, target), 4) for target in targets}
