"""Training data for the equivalence model: triplets, rule-made look-alikes, batches,
and the operating point a false-hit budget allows."""

from __future__ import annotations

import random

import numpy as np
import pytest

from costmesh_tools.cache.calibration import Judged, operating_threshold
from costmesh_tools.cache.intents import OOS, Example, IntentDataError, parse_data_sets
from costmesh_tools.cache.pairs import batches, nearest_intents, rule_negative, triplets
from services.cache.guard import refusal


@pytest.mark.parametrize(
    ("text", "changed"),
    [
        ("Why was my transfer of 200 pounds declined?", "numbers"),
        ("how can I cancel purchase 113542617735902?", "numbers"),
        ("move money from savings to checking", "polarity"),  # roles swapped, or negated
        ("I can pay with Visa", "polarity"),
    ],
)
def test_a_rule_made_look_alike_asks_something_else(text: str, changed: str) -> None:
    rng = random.Random(3)
    for _ in range(20):
        made = rule_negative(text, rng)
        assert made is not None
        anchor, negative = made
        assert anchor == text
        assert negative != text
    if changed == "numbers":  # another number is never the same question
        assert refusal(anchor, negative) == "numbers"


def test_swapped_roles_swap_the_two_places() -> None:
    rng = random.Random(0)
    seen = {rule_negative("move money from savings to checking", rng) for _ in range(40)}
    assert ("move money from savings to checking", "move money from checking to savings") in seen


def test_every_example_with_a_twin_gets_a_triplet_from_its_intent() -> None:
    examples = [Example(f"question {i} about {label}", label)
                for label in ("a", "b", "c") for i in range(4)]  # fmt: skip
    examples.append(Example("the only one of its intent", "d"))
    neighbours = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    made = triplets(examples, neighbours, seed=1)
    assert len(made) == 12  # "d" has no second question: no positive, no triplet
    by_text = {e.text: e.label for e in examples}
    for t in made:
        assert t.positive != t.anchor
        assert by_text[t.positive] == t.anchor_label
        if not t.negative_label.startswith("rule:"):
            assert by_text[t.negative] == neighbours[t.anchor_label][0]
    assert made == triplets(examples, neighbours, seed=1)  # seeded


def test_a_batch_never_holds_two_anchors_of_one_intent() -> None:
    examples = [Example(f"q{i}", f"intent{i % 5}") for i in range(60)]
    made = triplets(examples, {f"intent{i}": [f"intent{(i + 1) % 5}"] for i in range(5)}, 0)
    planned = batches(made, 4)
    assert sum(len(b) for b in planned) == len(made)
    for batch in planned:
        labels = [t.anchor_label for t in batch]
        assert len(labels) == len(set(labels)) <= 4


def test_nearest_intents_are_ranked_by_centroid_similarity() -> None:
    examples = [Example("a1", "a"), Example("b1", "b"), Example("c1", "c")]
    vectors = np.array([[1, 0, 0], [0.9, 0.1, 0], [0.1, 0.5, 1]], dtype=np.float32)
    assert nearest_intents(examples, vectors, k=1) == {"a": ["b"], "b": ["a"], "c": ["b"]}


def _judged(similarity: float, right: bool) -> Judged:
    query = Example("q", "x")
    return Judged(query, Example("c", "x" if right else "y"), similarity, "")


def test_the_operating_point_keeps_false_hits_within_the_budget_with_a_margin() -> None:
    judged = [_judged(0.99 - i * 0.0005, right=True) for i in range(300)]  # down to 0.84
    judged.append(_judged(0.90, right=False))  # one false hit among 300 right ones
    judged += [_judged(0.80 - i * 0.001, right=i % 2 == 0) for i in range(100)]
    threshold = operating_threshold(judged, 0.01)
    served = [j for j in judged if j.similarity >= threshold]
    false = sum(j.false for j in served)
    assert (false + 1) / len(served) <= 0.01
    assert sum(not j.false for j in served) >= 300  # every hit above the false one
    assert threshold > 0.79  # the half-wrong tail is not served


def test_with_no_threshold_within_the_budget_nothing_is_served() -> None:
    judged = [_judged(0.9, right=i % 3 > 0) for i in range(300)]
    assert operating_threshold(judged, 0.01) == 1.0


def test_out_of_scope_queries_are_false_whatever_they_match() -> None:
    assert Judged(Example("q", OOS), Example("c", OOS), 0.99, "").false


def test_data_set_names_are_checked() -> None:
    assert parse_data_sets("bitext, banking77") == ("bitext", "banking77")
    for bad in ("", "banking77,banking77", "imdb"):
        with pytest.raises(IntentDataError, match="subset of banking77, clinc150, bitext"):
            parse_data_sets(bad)
