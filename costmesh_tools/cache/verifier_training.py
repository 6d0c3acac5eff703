"""`costmesh cache train --verifier`: a cross-encoder that reads a question and a
stored one together and says whether they ask the same thing.

The embedding finds candidates; cosine alone cannot tell a rewording (other words,
same question) from a look-alike (same words, another question), because each text is
read without the other. A cross-encoder attends across the pair, so "reset my
password" against "reset my two-factor device" differs where it matters. This is the
verifier stage of GPTCache's evaluators and of re-ranking in retrieval, trained here
on the intent data: a pair is positive when both questions share an intent, negative
when the second is the nearest question of another intent the shipped embedding
finds (the look-alikes a cache actually retrieves) or a rule-made look-alike.

Training needs the `train` extra; what it writes runs on ONNX Runtime alone
(`services/cache/verifier.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from costmesh_tools.cache.intents import Example, load_intents
from costmesh_tools.cache.pairs import rule_negative
from costmesh_tools.cache.stock import minilm_dir, minilm_encoder
from costmesh_tools.cache.training import labelled, shrink
from services.cache.verifier import VERIFIER_FORMAT, VERIFIER_MAX_TOKENS
from services.common.embedding import MINILM, MODEL_FILE, ONNX_OPSET, SentenceEncoder

log = logging.getLogger(__name__)

BATCH = 32
LEARNING_RATE = 5e-5
HEAD_LEARNING_RATE = 1e-3
WARMUP_SHARE = 0.1
NEAREST = 20  # other-intent neighbours a hard negative is drawn from
RULE_SHARE = 0.15
FORWARD_CHUNK = 16


@dataclass(frozen=True)
class Pair:
    first: str
    second: str
    same: bool


@dataclass(frozen=True)
class VerifierOptions:
    data_sets: tuple[str, ...]
    data_dir: Path
    out: Path
    embedding: Path | None = None  # whose neighbours are the hard negatives (None: stock)
    name: str = "costmesh-qa-verifier"
    seed: int = 0
    max_examples: int = 0
    quantise: bool = True
    threads: int = 0


def make_pairs(examples: Sequence[Example], vectors: np.ndarray[Any, Any], seed: int) -> list[Pair]:
    """Per question: one positive (another question of its intent) and one negative
    (one of its nearest questions of another intent, or for some a rule-made
    look-alike), each pair in a random order."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_label[e.label].append(i)
    labels = np.array([e.label for e in examples])
    pairs = []
    for start in range(0, len(examples), 512):
        scores = vectors[start : start + 512] @ vectors.T
        for row, scored in enumerate(scores):
            i = start + row
            anchor = examples[i]
            same = [j for j in by_label[anchor.label] if examples[j].text != anchor.text]
            if not same:
                continue
            pairs.append(_ordered(anchor.text, examples[rng.choice(same)].text, True, rng))
            rule = rule_negative(anchor.text, rng) if rng.random() < RULE_SHARE else None
            if rule is not None:
                pairs.append(_ordered(rule[0], rule[1], False, rng))
                continue
            scored = np.where(labels == anchor.label, -np.inf, scored)
            nearest = np.argpartition(-scored, NEAREST)[:NEAREST]
            pairs.append(_ordered(anchor.text, examples[int(rng.choice(nearest))].text, False, rng))
    rng.shuffle(pairs)
    return pairs


def _ordered(a: str, b: str, same: bool, rng: random.Random) -> Pair:
    return Pair(a, b, same) if rng.random() < 0.5 else Pair(b, a, same)


def train(options: VerifierOptions) -> dict[str, Any]:
    import torch  # noqa: PLC0415 - the train extra

    started = time.monotonic()
    random.seed(options.seed)
    np.random.seed(options.seed)
    torch.manual_seed(options.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(options.threads or os.cpu_count() or 1)
    sets = [load_intents(n, options.data_dir, options.seed) for n in options.data_sets]
    examples = labelled(sets, "train")
    if options.max_examples:
        examples = random.Random(options.seed).sample(
            examples, min(options.max_examples, len(examples))
        )
    # Stock MiniLM's neighbours, not the shipped model's: that one was trained on these
    # questions, so its remaining confusions are mostly questions labelled apart that
    # ask the same thing, which would teach the verifier noise.
    encoder = (
        minilm_encoder(options.threads or 2)
        if options.embedding is None
        else SentenceEncoder.from_dir(options.embedding, threads=options.threads or 2)
    )
    vectors = encoder.embed_vectors([e.text for e in examples])
    pairs = make_pairs(examples, vectors, options.seed)
    model, tokenizer = _load_base()
    steps = _fine_tune(model, tokenizer, pairs)
    options.out.mkdir(parents=True, exist_ok=True)
    onnx_path = options.out / MODEL_FILE
    _export(model, onnx_path, quantise=options.quantise)
    shutil.copyfile(minilm_dir() / "tokenizer.json", options.out / "tokenizer.json")
    card: dict[str, Any] = {
        "format": VERIFIER_FORMAT,
        "name": options.name,
        "base": MINILM,
        "weights": "int8 embeddings, float16 matrices" if options.quantise else "float32",
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "training": {
            "data": list(options.data_sets),
            "seed": options.seed,
            "examples": len(examples),
            "pairs": len(pairs),
            "positives": sum(p.same for p in pairs),
            "steps": steps,
            "batch": BATCH,
            "learning_rate": LEARNING_RATE,
            "seconds": round(time.monotonic() - started),
        },
    }
    (options.out / "model.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def _load_base() -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

    folder = str(minilm_dir())
    return PairScorer(AutoModel.from_pretrained(folder)), AutoTokenizer.from_pretrained(folder)


def _pair_scorer_class() -> Any:
    import torch  # noqa: PLC0415

    class Scorer(torch.nn.Module):
        """MiniLM reads both questions at once; each side is mean-pooled (the pooling
        MiniLM was trained with), and a linear head over their cosine, product and
        difference gives the logit. The head starts as the plain cosine rule (scale
        20, boundary 0.8), so training refines a sensible judge instead of finding
        one from noise: with a fresh head on [CLS], the loss stayed at chance for
        hundreds of steps."""

        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert
            width = bert.config.hidden_size
            self.features = torch.nn.Linear(2 * width, 1)
            torch.nn.init.zeros_(self.features.weight)
            torch.nn.init.zeros_(self.features.bias)
            self.scale = torch.nn.Parameter(torch.tensor(20.0))
            self.boundary = torch.nn.Parameter(torch.tensor(0.8))

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            second = (attention_mask * token_type_ids).unsqueeze(-1).to(hidden.dtype)
            first = (attention_mask * (1 - token_type_ids)).unsqueeze(-1).to(hidden.dtype)
            a = (hidden * first).sum(1) / first.sum(1).clamp(min=1.0)
            b = (hidden * second).sum(1) / second.sum(1).clamp(min=1.0)
            a = torch.nn.functional.normalize(a, dim=-1)
            b = torch.nn.functional.normalize(b, dim=-1)
            cosine = (a * b).sum(-1)
            extra = self.features(torch.cat([a * b, (a - b).abs()], dim=-1)).squeeze(-1)
            return self.scale * (cosine - self.boundary) + extra

    return Scorer


def PairScorer(bert: Any) -> Any:  # noqa: N802 - builds a torch module lazily
    return _pair_scorer_class()(bert)


def _fine_tune(model: Any, tokenizer: Any, pairs: Sequence[Pair]) -> int:
    import torch  # noqa: PLC0415

    head = [p for n, p in model.named_parameters() if not n.startswith("bert.")]
    body = [p for n, p in model.named_parameters() if n.startswith("bert.")]
    optimiser = torch.optim.AdamW(
        [{"params": body, "lr": LEARNING_RATE}, {"params": head, "lr": HEAD_LEARNING_RATE}]
    )
    plan = [pairs[i : i + BATCH] for i in range(0, len(pairs), BATCH)]
    warmup = max(1, int(len(plan) * WARMUP_SHARE))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1 - step / max(len(plan), 1)),
    )
    loss_of = torch.nn.BCEWithLogitsLoss()
    model.train()
    for step, batch in enumerate(plan):
        # chunks of similar length: padding to the batch's longest costs several times
        order = sorted(range(len(batch)), key=lambda i: len(batch[i].first) + len(batch[i].second))
        optimiser.zero_grad()
        total = 0.0
        for start in range(0, len(order), FORWARD_CHUNK):
            chunk = [batch[i] for i in order[start : start + FORWARD_CHUNK]]
            encoded = tokenizer(
                [p.first for p in chunk],
                [p.second for p in chunk],
                padding=True,
                truncation=True,
                max_length=VERIFIER_MAX_TOKENS,
                return_tensors="pt",
            )
            logits = model(**encoded)
            target = torch.tensor([float(p.same) for p in chunk])
            loss = loss_of(logits, target) * len(chunk) / len(batch)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if step % 100 == 0:
            log.info("step %d of %d: loss %.4f", step, len(plan), total)
    model.eval()
    return len(plan)


def _export(model: Any, path: Path, *, quantise: bool) -> None:
    """The cross-encoder and a sigmoid in one graph: out comes P(same question)."""
    import torch  # noqa: PLC0415

    class Probability(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            return torch.sigmoid(self.model(input_ids, attention_mask, token_type_ids))

    example = torch.ones((1, 8), dtype=torch.int64)
    dynamic = {0: "batch", 1: "tokens"}
    plain = path.with_suffix(".fp32.onnx") if quantise else path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Probability().eval(),
            (example, example, torch.zeros_like(example)),
            str(plain),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["same"],
            dynamic_axes={
                "input_ids": dynamic,
                "attention_mask": dynamic,
                "token_type_ids": dynamic,
                "same": {0: "batch"},
            },
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    if quantise:
        shrink(plain, path)
        plain.unlink()
