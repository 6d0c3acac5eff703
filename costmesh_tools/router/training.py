"""Training the embedding classifier and measuring a classifier on labelled tickets."""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from costmesh_tools.router.tickets import DataError, Ticket
from services.router.artefact import TIERS, Matrix, TierModel, tier_sums, unfamiliarity
from services.router.policy import choose_tier

# Inverse regularisation strength: chosen on Banking77 train by cross-validation
# (C = 1 underfits 77 intents by 4 points; above 10 nothing improves).
DEFAULT_C = 10.0
HOLDOUT_SHARE = 0.15
# Held-out cheap scores kept in the artefact: the starting point of a cheap-share
# target before a router has seen enough traffic of its own.
PRIOR_QUANTILES = 201
# Share of held-out in-domain questions the out-of-domain bar may flag (they go to the
# safe tier: money, not quality). Nearest-centroid similarity was chosen over the
# classifier's own top probability and over 5-nearest-neighbour similarity on
# bitext -> CLINC150's out-of-scope set, Banking77 and CLINC150 (bench/NOTES.md).
OOD_HELDOUT_SHARE = 0.02
# Share of held-out questions below the familiar similarity: between the out-of-domain
# bar and it, the knob rises toward 1. The widest ramp (of 5%, 10%, 15%, 25%) that left
# the shipped artefact's validation knob where it was (bench/NOTES.md).
FAMILIAR_HELDOUT_SHARE = 0.05
# Knobs a trained artefact is validated at; the recommended one sends the most traffic
# below complex while at most this share of held-out complex requests goes cheaper.
VALIDATION_KNOBS = tuple(round(0.05 * i, 2) for i in range(1, 20))
MAX_COMPLEX_BELOW = 0.03


@dataclass(frozen=True)
class Trained:
    model: TierModel
    holdout_rows: int
    holdout_accuracy: float  # tier accuracy at the 0.5 knob, before the refit on all rows
    holdout_log_loss: float  # of the tier probabilities, after calibration
    temperature: float


def train(
    tickets: Sequence[Ticket],
    vectors: Matrix,
    embedding_model: str,
    source: str,
    *,
    c: float = DEFAULT_C,
    seed: int = 0,
) -> Trained:
    """Fit on all but a held-out share, calibrate the temperature on that share, then
    refit on every row with the temperature kept."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 - training only
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    classes, class_tiers, targets = _classes(tickets)
    counts = np.bincount(targets, minlength=len(classes))
    stratify = targets if counts.min() >= 2 else None
    fit_idx, held_idx = train_test_split(
        np.arange(len(tickets)), test_size=HOLDOUT_SHARE, random_state=seed, stratify=stratify
    )

    def fit(rows: npt.NDArray[np.intp]) -> LogisticRegression:
        if len(set(targets[rows].tolist())) < len(classes):
            raise DataError("every class needs examples on both sides of the held-out split")
        return LogisticRegression(C=c, max_iter=2000).fit(vectors[rows], targets[rows])

    first = fit(fit_idx)
    logits = first.decision_function(vectors[held_idx])
    temperature = _temperature(logits, targets[held_idx])
    held_tiers = tier_sums(_softmax(logits / temperature), class_tiers)
    truth = np.array([TIERS.index(tickets[i].tier) for i in held_idx])
    chosen = np.array([TIERS.index(choose_tier(p, 0.5)) for p in held_tiers])
    # Out of domain: the bar from centroids of the fitted rows, on the held-out rows.
    held_nearest = (
        vectors[held_idx] @ centroids(vectors[fit_idx], targets[fit_idx], len(classes)).T
    ).max(axis=1)
    ood_bar = float(np.quantile(held_nearest, OOD_HELDOUT_SHARE))
    familiar = float(np.quantile(held_nearest, FAMILIAR_HELDOUT_SHARE))
    held_ood = held_nearest < ood_bar
    validated = validation_knob(held_tiers, unfamiliarity(held_nearest, ood_bar, familiar), truth)
    log_loss = float(-np.mean(np.log(np.maximum(held_tiers[np.arange(len(truth)), truth], 1e-12))))
    cheap = (held_tiers[:, 0] + held_tiers[:, 1])[~held_ood]  # as a router observes them
    final = fit(np.arange(len(tickets)))
    weights, bias = final.coef_, final.intercept_
    if len(classes) == 2:  # sklearn keeps one row, the second class's logit
        weights = np.vstack([np.zeros_like(weights), weights])
        bias = np.concatenate([np.zeros_like(bias), bias])
    model = TierModel(
        weights=weights.astype(np.float32),
        bias=bias.astype(np.float32),
        classes=classes,
        class_tiers=class_tiers,
        temperature=temperature,
        embedding_model=embedding_model,
        centroids=centroids(vectors, targets, len(classes)),
        ood_min_similarity=round(ood_bar, 4),
        familiar_similarity=round(familiar, 4),
        meta={
            "trained_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "source": source,
            "rows": len(tickets),
            "c": c,
            "seed": seed,
            "holdout_rows": len(held_idx),
            "holdout_tier_accuracy": round(float(np.mean(chosen == truth)), 4),
            "ood_holdout_share": OOD_HELDOUT_SHARE,
            "familiar_holdout_share": FAMILIAR_HELDOUT_SHARE,
            "validation_knob": validated,
            "holdout_cheap_scores": [
                round(float(q), 4) for q in np.quantile(cheap, np.linspace(0, 1, PRIOR_QUANTILES))
            ],
        },
    )
    return Trained(model, len(held_idx), float(np.mean(chosen == truth)), log_loss, temperature)


def centroids(vectors: Matrix, targets: npt.NDArray[np.intp], classes: int) -> Matrix:
    """Each class's normalised mean vector."""
    sums = np.zeros((classes, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, targets, vectors.astype(np.float64))
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    result: Matrix = (sums / np.where(norms > 0, norms, 1.0)).astype(np.float32)
    return result


def route(
    probabilities: npt.NDArray[np.floating], unfamiliar: npt.NDArray[np.floating], knob: float
) -> npt.NDArray[np.intp]:
    """Each row's tier index as the router picks it: the knob raised by the row's
    unfamiliarity, and out-of-domain rows (unfamiliarity 1) to complex."""
    routed = np.array(
        [
            TIERS.index(choose_tier(p, knob, u))
            for p, u in zip(probabilities, unfamiliar, strict=True)
        ],
        dtype=np.intp,
    )
    routed[unfamiliar >= 1.0] = len(TIERS) - 1
    return routed


def validation_knob(
    probabilities: npt.NDArray[np.floating],
    unfamiliar: npt.NDArray[np.floating],
    truth: npt.NDArray[np.intp],
) -> float | None:
    """The knob that sends the most held-out traffic below complex while at most
    MAX_COMPLEX_BELOW of the complex requests go cheaper; None if none does."""
    complex_rows = truth == len(TIERS) - 1
    best: tuple[float, float] | None = None
    for knob in VALIDATION_KNOBS:
        routed = route(probabilities, unfamiliar, knob)
        below = float(np.mean(routed[complex_rows] < len(TIERS) - 1)) if complex_rows.any() else 0.0
        cheap = float(np.mean(routed < len(TIERS) - 1))
        # A tie goes to the higher (safer) knob: knobs rise, so >= keeps the last.
        if below <= MAX_COMPLEX_BELOW and (best is None or cheap >= best[1]):
            best = (knob, cheap)
    return None if best is None else best[0]


def _classes(
    tickets: Sequence[Ticket],
) -> tuple[tuple[str, ...], tuple[str, ...], npt.NDArray[np.intp]]:
    """Intents when every ticket has one (each must keep one tier), else the tiers."""
    labelled = sum(1 for t in tickets if t.label)
    if 0 < labelled < len(tickets):
        raise DataError(
            f"{len(tickets) - labelled} of {len(tickets)} tickets have no label: give every "
            "ticket its intent, or none (then the tiers themselves are learned)"
        )
    if len({t.tier for t in tickets}) < 2:
        raise DataError("training needs tickets of at least two tiers")
    by_intent = labelled > 0
    tier_of: dict[str, str] = {}
    for t in tickets:
        name = t.label if by_intent else t.tier
        if tier_of.setdefault(name, t.tier) != t.tier:
            raise DataError(f"intent {name!r} appears with tiers {tier_of[name]} and {t.tier}")
    classes = tuple(sorted(tier_of))
    index = {name: i for i, name in enumerate(classes)}
    targets = np.array([index[t.label if by_intent else t.tier] for t in tickets], dtype=np.intp)
    return classes, tuple(tier_of[c] for c in classes), targets


def _softmax(logits: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    if logits.ndim == 1:  # two classes: sklearn gives one logit per row
        logits = np.stack([np.zeros_like(logits), logits], axis=1)
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: npt.NDArray[np.float64] = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


def _temperature(logits: npt.NDArray[np.floating], targets: npt.NDArray[np.intp]) -> float:
    """The temperature that minimises held-out log-loss (Guo et al. 2017)."""
    from scipy.optimize import minimize_scalar  # noqa: PLC0415

    def nll(log_t: float) -> float:
        p = _softmax(logits / math.exp(log_t))
        return float(-np.mean(np.log(np.maximum(p[np.arange(len(targets)), targets], 1e-12))))

    found = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return round(math.exp(float(found.x)), 4)


# --- evaluation ---------------------------------------------------------------


@dataclass(frozen=True)
class KnobRow:
    """What routing at one knob value does to a labelled set."""

    knob: float
    confusion: npt.NDArray[np.int64]  # [true tier][routed tier]
    cost: float  # USD of the routed traffic
    large_cost: float  # USD with every request on the complex tier's model

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion)) / max(self.total, 1)

    def precision(self, tier: int) -> float:
        return _ratio(self.confusion[tier, tier], self.confusion[:, tier].sum())

    def recall(self, tier: int) -> float:
        return _ratio(self.confusion[tier, tier], self.confusion[tier].sum())

    def share(self, tier: int) -> float:
        return _ratio(self.confusion[:, tier].sum(), self.total)

    @property
    def complex_below(self) -> float:
        """Share of complex requests routed to a cheaper tier: the quality risk."""
        last = len(TIERS) - 1
        return _ratio(self.confusion[last, :last].sum(), self.confusion[last].sum())

    @property
    def cheap_share(self) -> float:
        return 1.0 - self.share(len(TIERS) - 1)

    @property
    def savings(self) -> float:
        return 1.0 - self.cost / self.large_cost if self.large_cost else 0.0


def _ratio(part: object, whole: object) -> float:
    return float(part) / float(whole) if float(whole) else 0.0  # type: ignore[arg-type]


def sweep(
    probabilities: npt.NDArray[np.floating],
    truth: Sequence[str],
    knobs: Sequence[float],
    request_costs: dict[str, npt.NDArray[np.float64]],
    unfamiliar: npt.NDArray[np.floating] | None = None,
) -> list[KnobRow]:
    """Route every row at each knob as the router would (the knob raised by each row's
    unfamiliarity, out-of-domain rows to complex); costs[tier][i] is request i on that
    tier's model."""
    true_idx = np.array([TIERS.index(t) for t in truth])
    edge = np.zeros(len(true_idx)) if unfamiliar is None else unfamiliar
    rows = []
    large = float(request_costs[TIERS[-1]].sum())
    for knob in knobs:
        routed = route(probabilities, edge, knob)
        confusion = np.zeros((len(TIERS), len(TIERS)), dtype=np.int64)
        np.add.at(confusion, (true_idx, routed), 1)
        cost = sum(float(request_costs[TIERS[t]][i]) for i, t in enumerate(routed))
        rows.append(KnobRow(knob, confusion, cost, large))
    return rows


def recommend(rows: Sequence[KnobRow], max_complex_below: float) -> KnobRow | None:
    """The knob that sends most traffic to cheaper tiers within the complex-risk bound."""
    fitting = [r for r in rows if r.complex_below <= max_complex_below]
    # A tie goes to the higher (safer) knob.
    return max(fitting, key=lambda r: (r.cheap_share, r.knob)) if fitting else None


@dataclass(frozen=True)
class CalibrationBin:
    low: float
    high: float
    rows: int
    predicted: float  # mean P(below complex) of the rows
    observed: float  # share of them that are truly below complex


def calibration(
    probabilities: npt.NDArray[np.floating], truth: Sequence[str], bins: int = 10
) -> tuple[float, list[CalibrationBin]]:
    """Expected calibration error of the cheap score P(simple) + P(moderate) against
    whether the request truly needs less than complex, and its reliability bins."""
    score = probabilities[:, 0] + probabilities[:, 1]
    cheap = np.array([t != TIERS[-1] for t in truth], dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(score, edges[1:-1]), 0, bins - 1)
    table, error = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        predicted, observed = float(score[mask].mean()), float(cheap[mask].mean())
        error += mask.mean() * abs(predicted - observed)
        table.append(CalibrationBin(edges[b], edges[b + 1], int(mask.sum()), predicted, observed))
    return float(error), table
