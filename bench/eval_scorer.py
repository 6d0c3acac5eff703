"""How well `costmesh eval`'s scorers tell a right free-text answer from a wrong one, and
where the match scorer's floor comes from.

Bitext's agent responses stand in for answers: for a question of intent A, a right answer
is another of A's responses (worded apart, as a model's or a cached rewording's would be),
and a wrong one is a response to a neighbouring intent of A's category (cancel an order
where the customer wanted to change it), to any other intent, or a polite deflection (the
realistic simulator's, `costmesh_simulator/texts.py`). The references the scorer holds
are KEY_SIZE responses per intent, about what the bundled workload holds per feature.

The floor is chosen on the router's training split of Bitext (as `costmesh_tools/router`
splits it, the seed the workload uses) and reported on its test split, from which the
bundled workload's questions come; the similarity scorer's threshold likewise, for
comparison. Needs the data sets beside the repository (../shared/data) or --data-dir.

    .venv/bin/python bench/eval_scorer.py
"""

from __future__ import annotations

import argparse
import csv
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from costmesh_simulator.texts import DEFLECTIONS
from costmesh_tools.cache.stock import minilm_encoder
from costmesh_tools.casestudy.support_workload import SPLIT_SEED
from costmesh_tools.router.tickets import BITEXT_CSV, Ticket, load_tickets

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KEY_SIZE, TRIALS, SEED = 10, 2000, 0
KINDS = ("right", "neighbour", "other", "deflection")
FLOORS = tuple(round(0.05 * i, 2) for i in range(0, 17))
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(6, 19))


@dataclass(frozen=True)
class Trial:
    """One answer to a question of `intent`, of one of KINDS."""

    intent: str
    answer: str
    kind: str


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    args = parser.parse_args()
    tickets = load_tickets("bitext", args.data_dir, SPLIT_SEED)
    with (args.data_dir / "bitext_customer_support" / BITEXT_CSV).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    responses = {row["instruction"]: row["response"] for row in rows}
    category = {row["intent"]: row["category"] for row in rows}
    embed = minilm_encoder(os.cpu_count() or 1).embed_vectors
    results = {}
    for split, split_tickets in (("train", tickets.train), ("test", tickets.test)):
        key, trials = _trials(split_tickets, responses, category, random.Random(SEED))
        results[split] = _measure(key, trials, embed)
    floor = _best(results["train"]["match"])
    threshold = _best(results["train"]["similarity"])
    print(f"chosen on train: match floor {floor}, similarity threshold {threshold}\n")
    print("| scorer | split | right answers kept | neighbour's accepted | other intent's "
          "accepted | deflections accepted | balanced accuracy |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for split in ("train", "test"):
        for name, setting in (("match", floor), ("similarity", threshold)):
            rates = results[split][name][setting]
            label = f"{name} ({'floor' if name == 'match' else 'threshold'} {setting})"
            cells = " | ".join(f"{rates[kind]:.1%}" for kind in KINDS)
            print(f"| {label} | {split} | {cells} | {_balanced(rates):.1%} |")
    print("\nmatch on the test split at other floors (chosen: the train split's best):")
    for setting in FLOORS:
        rates = results["test"]["match"][setting]
        print(f"  floor {setting:.2f}: " + ", ".join(f"{k} {rates[k]:.1%}" for k in KINDS))


def _trials(
    tickets: Sequence[Ticket],
    responses: dict[str, str],
    category: dict[str, str],
    rng: random.Random,
) -> tuple[dict[str, list[str]], list[Trial]]:
    """KEY_SIZE references per intent, and TRIALS questions' answers of each kind."""
    by_intent: dict[str, list[str]] = defaultdict(list)
    for ticket in tickets:
        by_intent[ticket.label].append(responses[ticket.text])
    key, unseen = {}, {}
    for intent, texts in sorted(by_intent.items()):
        shuffled = rng.sample(texts, len(texts))
        key[intent], unseen[intent] = shuffled[:KEY_SIZE], shuffled[KEY_SIZE:]
    intents = sorted(key)
    trials = []
    for _ in range(TRIALS):
        intent = rng.choice(intents)
        neighbours = [i for i in intents if i != intent and category[i] == category[intent]]
        others = [i for i in intents if i != intent]
        trials.append(Trial(intent, rng.choice(unseen[intent]), "right"))
        if neighbours:
            trials.append(Trial(intent, rng.choice(unseen[rng.choice(neighbours)]), "neighbour"))
        trials.append(Trial(intent, rng.choice(unseen[rng.choice(others)]), "other"))
        trials.append(Trial(intent, rng.choice(DEFLECTIONS), "deflection"))
    return key, trials


Rates = dict[str, float]  # per kind, the share scored right


def _measure(
    key: dict[str, list[str]], trials: Sequence[Trial], embed: object
) -> dict[str, dict[float, Rates]]:
    """Per scorer and setting, the share of each kind of answer scored right."""
    intents = sorted(key)
    texts = sorted({*(t.answer for t in trials), *(r for rs in key.values() for r in rs)})
    row = {text: i for i, text in enumerate(texts)}
    vectors: npt.NDArray[np.float32] = embed(texts)  # type: ignore[operator]
    means = np.stack([vectors[[row[r] for r in key[i]]].mean(axis=0) for i in intents])
    centroids = means / np.linalg.norm(means, axis=1, keepdims=True)
    answers = vectors[[row[t.answer] for t in trials]]
    closeness = answers @ centroids.T
    own = np.array([intents.index(t.intent) for t in trials])
    nearest = closeness.argmax(axis=1) == own
    own_closeness = closeness[np.arange(len(trials)), own]
    # Similarity to one reference: the question's own, the first of its intent's key.
    references = vectors[[row[key[t.intent][0]] for t in trials]]
    similarity = (answers * references).sum(axis=1)
    kinds = np.array([t.kind for t in trials])

    def rates(right: npt.NDArray[np.bool_]) -> Rates:
        return {kind: float(right[kinds == kind].mean()) for kind in KINDS}

    return {
        "match": {f: rates(nearest & (own_closeness >= f)) for f in FLOORS},
        "similarity": {t: rates(similarity >= t) for t in THRESHOLDS},
    }


def _balanced(rates: Rates) -> float:
    """The mean of right answers kept and wrong answers (of all three kinds) refused."""
    refused = np.mean([1 - rates[kind] for kind in KINDS[1:]])
    return float((rates["right"] + refused) / 2)


def _best(by_setting: dict[float, Rates]) -> float:
    return max(by_setting, key=lambda setting: _balanced(by_setting[setting]))


if __name__ == "__main__":
    main()
