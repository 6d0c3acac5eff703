"""The quality gate's arithmetic: score answers against reference answers, then compare
the treatment arm (cache, routing, budgets) with the control arm (the baseline model).

Four scorers, each giving a score in [0, 1] per answer:

- exact: 1 when the answer is the reference label (case, spaces and end punctuation
  aside), else 0; for features whose references are labels (an intent, escalate or
  not), where a wrong label is simply wrong;
- similarity (offline): cosine similarity of the answer and the reference, embedded
  with all-MiniLM-L6-v2, below zero counted as zero; for free text;
- judge: an LLM grades the answer against the reference on a fixed 1-5 rubric
  (eval_judge); grade N scores (N - 1) / 4, so the worst grade is 0 as with similarity.
  A reply that does not follow the format scores nothing and is counted.

- match: 1 when a free-text answer is closest to its own intent's reference answers
  among all of the feature's intents, else 0 (eval_match); for labelled free text.

`auto` (the default) scores label features exactly, labelled free text by match and the
rest by similarity.

A comparison is paired: each request is answered in both arms and the two scores sit
side by side. A request whose control answer failed or could not be scored says
nothing about the treatment and is left out (and counted); a treatment that failed to
answer scores 0, since the caller got no answer. The drop is relative to control:
(control mean - treatment mean) / control mean, with a percentile bootstrap interval.
The bootstrap draws distinct conversations, not requests: a question asked six times
is answered the same way six times (and from the cache in the treatment), so it is one
piece of evidence with six times the weight, and counting it as six would make the
interval too narrow. Each group also says the smallest true drop the gate would catch
80% of the time (the margin plus 0.84 standard errors of the drop), and so how many
requests a given drop needs.

Groups are the whole, each feature, and each true tier where the workload labels them
(`tier:complex`): routing decides by tier, and a policy that answers the hard tickets
badly can hide in the average of the easy ones. A slice whose own drop is over the
margin, with its interval above zero over at least MIN_SLICE_CONVERSATIONS distinct
conversations, fails the gate too, unless waived.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from costmesh_simulator.realism import LABEL
from costmesh_tools.casestudy.eval_judge import grade_score
from costmesh_tools.casestudy.workload import Message, WorkloadRequest

DEFAULT_MARGIN = 0.05
# A verdict needs most requests scored in both arms: beyond this share left out, the
# mean says too little about the rest.
UNSCORED_LIMIT = 0.10
BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95
# The gate fails a drop whose estimate is over the margin: it catches a true drop D
# 80% of the time once D - margin is Z_POWER standard errors.
Z_POWER = 0.841621
Z_INTERVAL = 1.959964  # half a 95% interval, in standard errors
TIER_PREFIX = "tier:"
# A bootstrap over fewer distinct conversations than this has too few values to give an
# interval: one question asked twenty times is one piece of evidence. Such a slice
# does not fail the gate on its own (the overall drop still counts).
MIN_SLICE_CONVERSATIONS = 5
# References that read as labels: at most this many words, and this many distinct.
LABEL_WORDS, LABEL_VALUES = 3, 50

Vectors = npt.NDArray[np.float32]


class NothingToCompareError(ValueError):
    """No request was answered and scored in the control arm (the CLI exits 2)."""


def strip_label(answer: str) -> str:
    """The answer without the simulated provider's label, which no reference carries."""
    return answer.removeprefix(LABEL).strip()


class SimilarityScorer:
    """Cosine similarity to the reference answer, all-MiniLM-L6-v2 by default.

    The model reads 256 tokens of each text: a longer answer is judged by its start.
    """

    name = "similarity"

    def __init__(self, embed: Callable[[Sequence[str]], Vectors]) -> None:
        self._embed = embed  # unit-length rows, one per text

    def score(self, answers: Sequence[str], references: Sequence[str]) -> list[float]:
        """One score per (answer, reference): an empty answer scores 0."""
        texts = sorted({*answers, *references} - {""})
        rows = {text: i for i, text in enumerate(texts)}
        vectors = self._embed(texts) if texts else np.empty((0, 0), dtype=np.float32)
        scores = []
        for answer, reference in zip(answers, references, strict=True):
            if not answer or not reference:
                scores.append(0.0)
                continue
            cosine = float(np.dot(vectors[rows[answer]], vectors[rows[reference]]))
            scores.append(min(max(cosine, 0.0), 1.0))
        return scores


def normal_label(text: str) -> str:
    """A label as compared: no simulator label, case, inner spacing or end punctuation."""
    return re.sub(r"\s+", " ", strip_label(text)).strip().strip(".!\"'`").lower()


def label_features(requests: Sequence[WorkloadRequest]) -> set[str]:
    """Features whose every reference is a short label from a small set."""
    references: dict[str, set[str]] = {}
    for request in requests:
        if request.reference:
            references.setdefault(request.feature, set()).add(normal_label(request.reference))
    return {
        feature
        for feature, values in references.items()
        if len(values) <= LABEL_VALUES and all(len(v.split()) <= LABEL_WORDS for v in values)
    }


def score_exactly(pairs: Sequence[Pair], features: Collection[str]) -> None:
    """Scores (in place) the answers of `features`: 1 for the reference label, else 0."""
    for pair in pairs:
        if pair.request.feature not in features:
            continue
        reference = normal_label(pair.request.reference or "")
        for answer in pair.answers:
            if not answer.error:
                answer.score = float(bool(reference) and normal_label(answer.content) == reference)


@dataclass
class Answer:
    """One arm's answer to one request, then its score."""

    content: str = ""
    error: str = ""  # the gRPC status when the call failed
    model: str = ""
    cached: bool = False
    cost_nano_usd: int = 0
    simulated: bool = False  # the reply carried the local simulator's label
    score: float | None = None  # None: not scored (failed, or the judge's reply unparseable)
    grade: int | None = None  # the judge's 1-5 grade
    judge_reply: str = ""
    judge_error: str = ""  # the gRPC status when the judge's call failed
    judge_cost_nano_usd: int = 0


@dataclass
class Pair:
    """A request answered in both arms."""

    request: WorkloadRequest
    control: Answer
    treatment: Answer

    @property
    def answers(self) -> tuple[Answer, Answer]:
        return self.control, self.treatment

    @property
    def scores(self) -> tuple[float, float] | None:
        """(control, treatment) scores, or None when the pair is left out."""
        if self.control.score is None:
            return None
        if self.treatment.error:
            return self.control.score, 0.0
        if self.treatment.score is None:
            return None
        return self.control.score, self.treatment.score


def score_by_similarity(
    pairs: Sequence[Pair], scorer: SimilarityScorer, only: Collection[str]
) -> None:
    """Scores every answer given (in place) to a request of the features `only` by its
    similarity to the reference."""
    answered = [
        (a, p.request.reference or "")
        for p in pairs
        if p.request.feature in only
        for a in p.answers
        if not a.error
    ]
    scores = scorer.score([a.content for a, _ in answered], [r for _, r in answered])
    for (answer, _), score in zip(answered, scores, strict=True):
        answer.score = score


def score_by_grades(pairs: Sequence[Pair]) -> None:
    """Scores every answer the judge graded (in place); the others stay unscored."""
    for answer in (a for p in pairs for a in p.answers):
        answer.score = None if answer.grade is None else grade_score(answer.grade)


@dataclass(frozen=True)
class Group:
    """The two arms' scores over a feature's requests, or over all of them."""

    name: str
    requests: int  # compared: answered and scored in both arms
    conversations: int  # distinct among them: what the interval is drawn over
    control: float
    treatment: float
    drop: float  # relative to control; negative when the treatment does better
    drop_low: float  # the confidence interval of the drop
    drop_high: float
    standard_error: float  # of the drop, from the bootstrap (at least one request's worth)

    def over(self, margin: float) -> bool:
        # Float noise must not fail a drop of exactly the margin (1 - 0.95 > 0.05).
        return self.drop > margin + 1e-9

    def detectable(self, margin: float) -> float:
        """The smallest true drop the gate fails 80% of the time at these requests."""
        return margin + Z_POWER * self.standard_error

    def needed_to_clear(self, margin: float) -> int | None:
        """Requests (of this mix) for the interval to end below the margin at this drop;
        None when it already does, or when the drop itself is not below the margin."""
        if self.drop_high <= margin or self.drop >= margin:
            return None
        half_width = Z_INTERVAL * self.standard_error
        needed = math.ceil(self.requests * (half_width / (margin - self.drop)) ** 2)
        return max(needed, self.requests + 1)  # a lopsided interval can make it look done

    def needed(self, drop: float, margin: float) -> int | None:
        """Requests (of this mix) for the gate to fail a true `drop` 80% of the time;
        None for a drop within the margin, which the gate is meant to pass."""
        if drop <= margin:
            return None
        return max(
            2, math.ceil(self.requests * (Z_POWER * self.standard_error / (drop - margin)) ** 2)
        )


@dataclass(frozen=True)
class Comparison:
    """The gate's verdict and everything it was reached from."""

    margin: float
    overall: Group
    features: tuple[Group, ...]
    tiers: tuple[Group, ...]  # by the requests' true tier, where the workload gives it
    pairs: int
    left_out: int  # control failed or unscored, or the treatment's answer unscored
    control_errors: int
    treatment_errors: int
    unparseable: int  # judge replies that did not follow the format, both arms
    judge_errors: int  # judge calls that failed, both arms
    waived: frozenset[str] = frozenset()  # slices whose own drop does not fail the gate

    @property
    def passed(self) -> bool:
        return not self.reasons

    @property
    def slices(self) -> tuple[Group, ...]:
        return self.features + self.tiers

    @property
    def slices_over(self) -> tuple[Group, ...]:
        """The features and tiers whose own drop is beyond the margin."""
        return tuple(g for g in self.slices if g.over(self.margin))

    @property
    def slices_failing(self) -> tuple[Group, ...]:
        """Those of them whose interval is wholly above zero (a drop, not noise of a
        few requests), drawn over at least MIN_SLICE_CONVERSATIONS distinct ones, and not
        waived: each fails the gate."""
        return tuple(
            g for g in self.slices_over
            if g.drop_low > 0 and g.conversations >= MIN_SLICE_CONVERSATIONS
            and g.name not in self.waived
        )  # fmt: skip

    @property
    def reasons(self) -> list[str]:
        """Why the gate fails; empty when it passes."""
        reasons = []
        if self.left_out > UNSCORED_LIMIT * self.pairs:
            reasons.append(
                f"{self.left_out} of {self.pairs} requests could not be compared "
                f"(at most {UNSCORED_LIMIT:.0%} may be)"
            )
        if self.overall.over(self.margin):
            # Two decimals: a drop just over the margin must not print as the margin.
            reasons.append(
                f"treatment scores {self.overall.drop:.2%} below control, more than the "
                f"{self.margin:.2%} margin"
            )
        reasons += [
            f"{g.name} scores {g.drop:.2%} below control on its own (--waive {g.name} to accept it)"
            for g in self.slices_failing
        ]
        return reasons


def compare(
    pairs: Sequence[Pair], margin: float, seed: int = 0, waived: Collection[str] = ()
) -> Comparison:
    """Overall, per-feature and per-tier means per arm and the treatment's drop;
    NothingToCompare when no request could be compared."""
    compared = [(p, s) for p in pairs if (s := p.scores) is not None]
    if not compared:
        raise NothingToCompareError(_nothing_why(pairs))
    rng = np.random.default_rng(seed)

    def groups(slice_of: Callable[[WorkloadRequest], str | None]) -> tuple[Group, ...]:
        names = sorted({name for p, _ in compared if (name := slice_of(p.request))})
        return tuple(_group(n, [(p, s) for p, s in compared if slice_of(p.request) == n], rng)
                     for n in names)  # fmt: skip

    answers = [a for p in pairs for a in p.answers]
    return Comparison(
        margin=margin,
        overall=_group("all", compared, rng),
        features=groups(lambda request: request.feature),
        tiers=groups(lambda request: request.tier and TIER_PREFIX + request.tier),
        pairs=len(pairs),
        left_out=len(pairs) - len(compared),
        control_errors=sum(1 for p in pairs if p.control.error),
        treatment_errors=sum(1 for p in pairs if p.treatment.error),
        unparseable=sum(1 for a in answers if a.judge_reply and a.grade is None),
        judge_errors=sum(1 for a in answers if a.judge_error),
        waived=frozenset(waived),
    )


def _nothing_why(pairs: Sequence[Pair]) -> str:
    errors = [p.control.error for p in pairs if p.control.error]
    if errors:
        return f"every control request failed ({_most_common(errors)})"
    unparseable = sum(1 for p in pairs if p.control.judge_reply and p.control.grade is None)
    judge_errors = [p.control.judge_error for p in pairs if p.control.judge_error]
    why = f"judge replies unparseable: {unparseable}, judge calls failed: {len(judge_errors)}"
    if judge_errors:
        why += f", {_most_common(judge_errors)}"
    return f"no control answer could be scored ({why})"


def _most_common(errors: Sequence[str]) -> str:
    common = max(set(errors), key=errors.count)
    return f"{errors.count(common)} with {common}"


def _group(
    name: str, compared: Sequence[tuple[Pair, tuple[float, float]]], rng: np.random.Generator
) -> Group:
    """The arms' means and the drop's interval, bootstrapped over distinct conversations."""
    conversations: dict[tuple[Message, ...], int] = {}
    index = [conversations.setdefault(p.request.messages, len(conversations)) for p, _ in compared]
    values = np.array([s for _, s in compared], dtype=np.float64)
    # Per conversation: how often it was asked and its scores summed over those times.
    sums = np.zeros((len(conversations), 3))
    np.add.at(sums, index, np.column_stack([np.ones(len(values)), values]))
    draws = rng.integers(0, len(sums), size=(BOOTSTRAP_SAMPLES, len(sums)))
    drawn = sums[draws].sum(axis=1)
    drops = _drop(drawn[:, 1] / drawn[:, 0], drawn[:, 2] / drawn[:, 0])
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(drops, [tail, 100 - tail])
    control, treatment = values[:, 0], values[:, 1]
    return Group(
        name=name,
        requests=len(values),
        conversations=len(sums),
        control=float(control.mean()),
        treatment=float(treatment.mean()),
        drop=float(_drop(np.array([control.mean()]), np.array([treatment.mean()]))[0]),
        drop_low=float(low),
        drop_high=float(high),
        # Pairs that all agree give the bootstrap no spread: one conversation changing
        # its score is the least the data can say.
        standard_error=max(float(np.std(drops)), 1.0 / len(sums)),
    )


def _drop(
    control: npt.NDArray[np.float64], treatment: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """(control - treatment) / control; 0 where control is 0 (nothing can score below it)."""
    safe = np.where(control > 0, control, 1.0)
    result: npt.NDArray[np.float64] = np.where(control > 0, (control - treatment) / safe, 0.0)
    return result
