"""The simulator's opt-in realistic mode: per-model latency, answers whose length and quality
follow the request and the model, token counts from the OpenAI tokenizers, and a
confidence (self-rating, logprobs) that drops when the answer is a wrong one.

Still a simulator: every answer is labelled "[simulated] " and none is model output. Every
draw is a hash of (seed, model, request), so a replay gives the same answers and timings.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from costmesh_simulator.knowledge import TIERS, Entry, Knowledge
from costmesh_simulator.texts import (
    CLOSERS,
    DEFLECTIONS,
    OPENERS,
    STEPS,
    one_word_options,
)
from costmesh_simulator.wire import (
    CLASSIFY_MARKER,
    CONFIDENCE_MARKER,
    RATING_SUFFIX,
    Prompt,
    classify,
    unit,
)
from services.providers.tokens import PER_MESSAGE, REPLY_PRIMING, encoding_for

LABEL = "[simulated] "


@dataclass(frozen=True)
class LatencyProfile:
    """How fast a model answers: first token, prompt reading, then generation."""

    first_token_seconds: float
    tokens_per_second: float
    prompt_tokens_per_second: float


# Rounded public medians of OpenAI's API: time to first token and output speed.
PROFILES = {
    "gpt-4o": LatencyProfile(0.45, 80.0, 8_000.0),
    "gpt-4o-mini": LatencyProfile(0.30, 120.0, 12_000.0),
}
# Models without a profile of their own (self-hosted ones, say) sit between the two.
MIDDLE_PROFILE = LatencyProfile(0.40, 100.0, 10_000.0)
EMBEDDING_SECONDS, EMBEDDING_TOKENS_PER_SECOND = 0.05, 100_000.0
# Log-normal spread of the seeded jitter on the first token's time and on the speed.
FIRST_TOKEN_SIGMA, SPEED_SIGMA = 0.25, 0.10

# Tiers of models the configuration says nothing of; a model is small unless complex.
DEFAULT_MODEL_TIERS = {"gpt-4o": "complex", "gpt-4o-mini": "simple"}
# Share of wrong answers to a known question, by model class and the question's tier
# (a question without a tier counts as moderate). Chosen so that routing the bundled
# workload's simple and moderate tickets to the small model costs about the 1.5 points
# of resolution accuracy the case reports (91% -> 89.5%); the complex rate is what
# routing exists to avoid.
WRONG_RATES = {
    ("small", "simple"): 0.02, ("small", "moderate"): 0.05, ("small", "complex"): 0.35,
    ("strong", "simple"): 0.01, ("strong", "moderate"): 0.02, ("strong", "complex"): 0.04,
}  # fmt: skip
# Of the wrong answers, the share that is another intent's answer (the rest deflect).
OTHER_ANSWER_SHARE = 0.5
# Share of wrong tiers when the router's LLM classifier asks about a known question.
MISLABEL_RATES = {"small": 0.15, "strong": 0.05}
# Normal (mean, sd) of the self-rating 0..10 and of an answer's mean token logprob, for
# right and wrong answers: the judges catch most wrong answers, and a few right ones.
RATING = {False: (8.5, 1.2), True: (5.5, 1.5)}
MEAN_LOGPROB = {False: (-0.2, 0.1), True: (-0.5, 0.2)}


@dataclass(frozen=True)
class Timing:
    """When a simulated answer is ready, in seconds: its first token, then the rest."""

    first_token: float
    generation: float

    @property
    def total(self) -> float:
        return self.first_token + self.generation


@dataclass(frozen=True)
class ChatReply:
    """An answer and what the wire reports of it."""

    content: str
    truncated: bool
    prompt_tokens: int
    completion_tokens: int
    # The content cut where its tokens start (a character split across tokens stays whole).
    pieces: list[str]
    logprobs: list[float] | None


def configure(
    *,
    realistic: bool,
    latency_scale: float = 1.0,
    knowledge: Knowledge | str | Path | None = None,
    seed: int = 0,
    model_tiers: Mapping[str, str] | None = None,
) -> Realism | None:
    """The realism a simulator is asked for; None keeps its instant placeholder answers.
    ValueError (KnowledgeError for the file) names the argument that is wrong."""
    _check_scale(latency_scale)
    if not realistic:
        if knowledge is not None and str(knowledge):
            raise ValueError("knowledge: only read in realistic mode (realistic=True)")
        return None
    if isinstance(knowledge, str | Path):
        knowledge = Knowledge.load(knowledge) if str(knowledge) else None
    return Realism(
        latency_scale=latency_scale, knowledge=knowledge, seed=seed, model_tiers=model_tiers
    )


def _check_scale(latency_scale: float) -> None:
    if not (math.isfinite(latency_scale) and latency_scale >= 0):
        raise ValueError(f"latency_scale: must be a number >= 0, got {latency_scale!r}")


def profile_for(model: str) -> LatencyProfile:
    """The profile of `model` or of the longest name it starts with (dated snapshots such
    as gpt-4o-2024-08-06), else the middle one."""
    names = [name for name in PROFILES if model.startswith(name)]
    return PROFILES[max(names, key=len)] if names else MIDDLE_PROFILE


class Realism:
    """Answers and timings for a realistic simulator."""

    def __init__(
        self,
        *,
        latency_scale: float = 1.0,
        knowledge: Knowledge | None = None,
        seed: int = 0,
        model_tiers: Mapping[str, str] | None = None,
    ) -> None:
        _check_scale(latency_scale)
        tiers = {**DEFAULT_MODEL_TIERS, **(model_tiers or {})}
        for model, tier in tiers.items():
            if tier not in TIERS:
                message = f"one of {', '.join(TIERS)}, got {tier!r}"
                raise ValueError(f"model_tiers[{model!r}]: expected {message}")
        self.latency_scale = latency_scale
        self.knowledge = Knowledge() if knowledge is None else knowledge
        self._seed = seed
        self._tiers = tiers

    def reply(self, model: str, prompt: Prompt, limit: int | None, logprobs: bool) -> ChatReply:
        """The answer to a chat request, cut to `limit` tokens."""
        text, wrong = self._compose(model, prompt)
        content, truncated = self._truncate(model, text, limit)
        pieces = self.pieces(model, content)
        return ChatReply(
            content,
            truncated,
            REPLY_PRIMING + sum(PER_MESSAGE + self.count(model, t) for t in prompt.texts),
            self.count(model, content),
            pieces,
            self._logprobs(model, _key(prompt), len(pieces), wrong) if logprobs else None,
        )

    def chat_timing(
        self, model: str, prompt: Prompt, prompt_tokens: int, completion_tokens: int
    ) -> Timing:
        """First token after the model's base time and reading the prompt, then the
        output at the model's speed, each with seeded jitter, times latency_scale."""
        profile = profile_for(model)
        key = _key(prompt)
        slowdown = math.exp(FIRST_TOKEN_SIGMA * self._normal("first-token", model, key))
        speedup = math.exp(SPEED_SIGMA * self._normal("speed", model, key))
        first = profile.first_token_seconds * slowdown
        first += prompt_tokens / profile.prompt_tokens_per_second
        generation = completion_tokens / (profile.tokens_per_second * speedup)
        return Timing(first * self.latency_scale, generation * self.latency_scale)

    def embedding_seconds(self, tokens: int) -> float:
        return (EMBEDDING_SECONDS + tokens / EMBEDDING_TOKENS_PER_SECOND) * self.latency_scale

    def count(self, model: str, text: str) -> int:
        """Tokens of `text` in the model's encoding (special-token text counts as text)."""
        return len(encoding_for(model).encode_ordinary(text))

    def pieces(self, model: str, text: str) -> list[str]:
        """`text` split where its tokens start; they join back to `text`."""
        encoding = encoding_for(model)
        pieces, pending = [], b""
        for token in encoding.encode_ordinary(text):
            pending += encoding.decode_single_token_bytes(token)
            try:
                pieces.append(pending.decode())
            except UnicodeDecodeError:
                continue  # the rest of this character is in the next token
            pending = b""
        return pieces

    def _compose(self, model: str, prompt: Prompt) -> tuple[str, bool]:
        """The full answer before any cut, and whether it is a wrong one."""
        question, key = prompt.last_user, _key(prompt)
        entry = self.knowledge.find(_conversation(prompt), question)
        if any(CLASSIFY_MARKER in system for system in prompt.system):
            return self._tier_label(model, key, question, entry), False
        wrong = False
        options = one_word_options(prompt.system)
        if entry is not None and entry.reference:
            rate = WRONG_RATES[self._strength(model), entry.tier or "moderate"]
            wrong = self._draw("wrong", model, key) < rate
            answer = self._wrong_answer(model, key, entry) if wrong else entry.reference
        elif options:
            answer = options[int(self._draw("option", model, key) * len(options))]
        else:
            answer = self._generic_answer(model, key, question)
        answer = LABEL + answer
        if any(CONFIDENCE_MARKER in system for system in prompt.system):
            mean, sd = RATING[wrong]
            rating = round(mean + sd * self._normal("rating", model, key))
            answer += f"\n[CONFIDENCE: {min(max(rating, 0), 10)}]"
        return answer, wrong

    def _strength(self, model: str) -> str:
        return "strong" if self._tiers.get(model) == "complex" else "small"

    def _tier_label(self, model: str, key: str, question: str, entry: Entry | None) -> str:
        """The router's LLM classifier: a known question's tier, now and then a neighbour."""
        if entry is None or not entry.tier:
            return classify(question)
        if self._draw("mislabel", model, key) >= MISLABEL_RATES[self._strength(model)]:
            return entry.tier
        index = TIERS.index(entry.tier)
        neighbours = [TIERS[i] for i in (index - 1, index + 1) if 0 <= i < len(TIERS)]
        return neighbours[int(self._draw("neighbour", model, key) * len(neighbours))]

    def _wrong_answer(self, model: str, key: str, entry: Entry) -> str:
        """Plausible but wrong: another intent's answer (always, for one-word answers such
        as an intent name), else a polite deflection."""
        one_word = len(entry.reference.split()) == 1
        if one_word or self._draw("wrong-kind", model, key) < OTHER_ANSWER_SHARE:
            other = self.knowledge.other_answer(entry, self._draw("other", model, key))
            if other is not None:
                return other
        return DEFLECTIONS[int(self._draw("deflection", model, key) * len(DEFLECTIONS))]

    def _generic_answer(self, model: str, key: str, question: str) -> str:
        """A support-style answer to an unknown question, longer for longer questions."""
        spread = math.exp(0.35 * self._normal("length", model, key))
        target = min(max((40 + 1.2 * self.count(model, question)) * spread, 20), 220)
        rng = random.Random(int(self._draw("generic", model, key) * 2**53))
        steps = rng.sample(STEPS, len(STEPS))
        sentences = [rng.choice(OPENERS)]
        closer = rng.choice(CLOSERS)
        length = self.count(model, sentences[0] + closer)
        while steps and length < target:
            sentences.append(steps.pop())
            length += self.count(model, sentences[-1]) + 1
        return " ".join([*sentences, closer])

    def _truncate(self, model: str, text: str, limit: int | None) -> tuple[str, bool]:
        """At most `limit` tokens, cut at a token boundary."""
        encoding = encoding_for(model)
        tokens = encoding.encode_ordinary(text)
        if limit is None or len(tokens) <= limit:
            return text, False
        cut: str = encoding.decode_bytes(tokens[:limit]).decode("utf-8", "ignore")
        while self.count(model, cut) > limit:  # a prefix may re-tokenise differently
            cut = cut[:-1]
        return cut, True

    def _logprobs(self, model: str, key: str, count: int, wrong: bool) -> list[float]:
        """Token logprobs around a per-answer level, lower for a wrong answer."""
        mean, sd = MEAN_LOGPROB[wrong]
        level = min(mean + sd * self._normal("logprob", model, key), -0.02)
        rng = random.Random(int(self._draw("logprobs", model, key) * 2**53))
        return [round(level * (0.25 + 1.5 * rng.random()), 6) for _ in range(count)]

    def _draw(self, purpose: str, model: str, key: str) -> float:
        """Uniform in [0, 1), fixed by (seed, purpose, model, request)."""
        return unit(f"{self._seed}\0{purpose}\0{model}\0{key}")

    def _normal(self, purpose: str, model: str, key: str) -> float:
        """Standard normal, fixed like _draw, within three standard deviations."""
        draw = min(max(self._draw(purpose, model, key), 1e-9), 1 - 1e-9)
        return min(max(NormalDist().inv_cdf(draw), -3.0), 3.0)


def _conversation(prompt: Prompt) -> list[str]:
    """The request's message texts as the caller wrote them, without a rating request."""
    return [text.removesuffix(RATING_SUFFIX) for text in prompt.texts]


def _key(prompt: Prompt) -> str:
    """What a request's draws hang on: its whole conversation, so one question asked for
    two purposes is answered (rightly or wrongly) apart, and a rating request changes
    nothing."""
    return "\x1f".join(_conversation(prompt))
