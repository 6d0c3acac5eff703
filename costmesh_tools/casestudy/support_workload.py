"""The case study's workload: Bitext support tickets as a support platform's LLM traffic.

The case is a support platform handling 50,000 tickets a day with five LLM features.
Each request is one Bitext question sent to one feature, as the user message under
the feature's system prompt:

| feature | share | max_tokens | reference |
|---|---:|---:|---|
| ticket-classification | 25% | 16 | the intent |
| response-generation | 30% | 400 | Bitext's agent response |
| escalation-decision | 15% | 8 | `escalate` for complex-tier intents, else `resolve` |
| sentiment-analysis | 15% | 8 | none (Bitext has no sentiment labels) |
| kb-search | 15% | 250 | Bitext's agent response |

Shares: every ticket is classified once, and gets a drafted reply, sometimes two (the
agent asks again); the escalation decision runs on the tickets the assistant might
answer alone, sentiment on a sample for the quality dashboard, and knowledge-base
answers serve agents' and customers' look-ups. That is about four calls a ticket.
max_tokens caps each answer: an intent name is under 10 tokens, a verdict or
sentiment one or two; Bitext's responses run 137 tokens at the median, 242 at the
99th percentile and 448 at most (gpt-4o's tokenizer), so 400 leaves a draft room and
250 holds a knowledge-base answer to the usual length. The knowledge base's passages
are not in the prompt: the data set has none, and inventing them would skew costs.

Questions come only from the held-out test split of `costmesh_tools/router/tickets.py`
(`SPLIT_SEED`, the seed the shipped router artefact was trained with), so the router
never routes a question it has learnt. Traffic repeats itself as query logs do: an
intent is drawn in proportion to its rows in the split (Bitext's own mix), then a
phrasing by Zipf(1) popularity over a seeded ranking of that intent's questions, so
popular phrasings recur verbatim and the rest arrive as paraphrases. Nothing is tuned
to a cache-hit rate. Timestamps follow a support desk's day (UTC: quiet at night,
busiest mid-morning and mid-afternoon) from `START`, seeded.
"""

from __future__ import annotations

import csv
import datetime
import itertools
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from costmesh_tools.casestudy.workload import Message, WorkloadError, WorkloadRequest
from costmesh_tools.router.tickets import BITEXT_CSV, DataError, load_tickets

SPLIT_SEED = 0
TEAM = "support"
START = datetime.datetime(2026, 11, 2, tzinfo=datetime.UTC)  # a Monday
BUNDLED_REQUESTS = 1200
BUNDLED_SEED = 0
# The quality gate's workload: the same held-out questions, another seed, and enough
# distinct tickets per feature and tier for the gate to see a drop near its 5% margin.
EVAL_REQUESTS = 5000
EVAL_SEED = 1
EVAL_DAYS = 4
# Relative traffic in each UTC hour of a support desk's day.
DAILY_CURVE = (2, 1, 1, 1, 1, 2, 4, 7, 10, 12, 12, 11, 9, 10, 11, 11, 10, 8, 6, 5, 4, 3, 3, 2)


@dataclass(frozen=True)
class Question:
    """A held-out Bitext ticket with its intent, tier and the agent's response."""

    text: str
    intent: str
    tier: str
    response: str


@dataclass(frozen=True)
class Feature:
    name: str
    share: float
    max_tokens: int
    system: str  # `{intents}` is replaced by the intents, comma-separated
    reference: Callable[[Question], str | None]


_STORE = "You work for an online store's customer support. "
FEATURES = (
    Feature(
        "ticket-classification", 0.25, 16,
        _STORE + "Classify the customer's message into exactly one of these intents: "
        "{intents}. Reply with the intent name only.",
        lambda q: q.intent,
    ),
    Feature(
        "response-generation", 0.30, 400,
        _STORE + "Draft the agent's reply to the customer's message: friendly, concise, "
        "with numbered steps where the task has steps. Write details you do not know "
        "as placeholders in double braces, such as {{{{Order Number}}}}.",
        lambda q: q.response,
    ),
    Feature(
        "escalation-decision", 0.15, 8,
        _STORE + "Decide whether a human agent must take over this ticket. Reply with "
        "one word: escalate (disputes, complaints, failed payments, problems that "
        "need investigation) or resolve (the assistant can answer it).",
        lambda q: "escalate" if q.tier == "complex" else "resolve",
    ),
    Feature(
        "sentiment-analysis", 0.15, 8,
        _STORE + "Rate the sentiment of the customer's message. Reply with one word: "
        "positive, neutral or negative.",
        lambda q: None,
    ),
    Feature(
        "kb-search", 0.15, 250,
        _STORE + "Answer the customer's question from the help centre's articles: "
        "the steps to follow and where to find them on the website. Write details "
        "you do not know as placeholders in double braces.",
        lambda q: q.response,
    ),
)  # fmt: skip


def bundled_workload_path() -> Path:
    """The workload shipped with costmesh (`make workload` rebuilds it)."""
    return Path(__file__).with_name("support-workload.jsonl.gz")


def eval_workload_path() -> Path:
    """The quality gate's workload shipped with costmesh (`make workload` rebuilds it)."""
    return Path(__file__).with_name("support-eval.jsonl.gz")


def held_out_questions(data_dir: Path) -> tuple[Question, ...]:
    """Bitext's test split as the router's training leaves it, with the responses."""
    tickets = load_tickets("bitext", data_dir, SPLIT_SEED)
    path = data_dir / "bitext_customer_support" / BITEXT_CSV
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if "response" not in (reader.fieldnames or ()):
            raise DataError(f"{path}: no column response")
        responses = {row["instruction"]: row["response"] for row in reader}
    return tuple(Question(t.text, t.label, t.tier, responses[t.text]) for t in tickets.test)


def generate(count: int, seed: int, data_dir: Path, days: int = 1) -> list[WorkloadRequest]:
    """`count` requests over `days` days, by timestamp; the same for the same seed."""
    if count < 1 or days < 1:
        raise WorkloadError("the request count and the number of days must be positive")
    rng = random.Random(seed)
    questions, weights = _popularity(held_out_questions(data_dir), rng)
    intents = ", ".join(sorted({q.intent for q in questions}))
    features = rng.choices(FEATURES, weights=[f.share for f in FEATURES], k=count)
    picks = rng.choices(questions, cum_weights=list(itertools.accumulate(weights)), k=count)
    hours = list(itertools.accumulate(DAILY_CURVE))
    times = [
        START
        + datetime.timedelta(
            days=rng.randrange(days),
            hours=rng.choices(range(24), cum_weights=hours)[0],
            seconds=rng.randrange(3600),
        )
        for _ in range(count)
    ]
    width = max(6, len(str(count)))
    return [
        _request(f"w-{n:0{width}d}", times[i], features[i], picks[i], intents)
        for n, i in enumerate(sorted(range(count), key=times.__getitem__), 1)
    ]


def _popularity(
    questions: Sequence[Question], rng: random.Random
) -> tuple[list[Question], list[float]]:
    """Each intent's share of the pool, spread over its phrasings by Zipf(1) rank."""
    by_intent: dict[str, list[Question]] = defaultdict(list)
    for question in sorted(questions, key=lambda q: (q.intent, q.text)):
        by_intent[question.intent].append(question)
    pool: list[Question] = []
    weights: list[float] = []
    for group in by_intent.values():
        rng.shuffle(group)
        harmonic = sum(1 / rank for rank in range(1, len(group) + 1))
        pool.extend(group)
        weights.extend(len(group) / (rank * harmonic) for rank in range(1, len(group) + 1))
    return pool, weights


def _request(
    rid: str, at: datetime.datetime, feature: Feature, question: Question, intents: str
) -> WorkloadRequest:
    return WorkloadRequest(
        id=rid,
        timestamp=at,
        team=TEAM,
        feature=feature.name,
        messages=(
            Message("system", feature.system.format(intents=intents)),
            Message("user", question.text),
        ),
        label=question.intent,
        tier=question.tier,
        reference=feature.reference(question),
        max_tokens=feature.max_tokens,
    )
