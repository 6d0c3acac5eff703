"""`costmesh cache train`: fine-tune MiniLM to tell a reworded question from a
look-alike, export it to ONNX, quantise it, and calibrate its thresholds.

The recipe follows Redis's langcache-embed (arXiv 2504.02268): one epoch of
contrastive fine-tuning on question pairs. Each batch holds one question per intent,
its reworded twin and a hard negative (a near intent's question or a rule-made
look-alike); every other row of the batch is a negative too (multiple-negatives
ranking loss, scale 20). Everything is seeded, on the CPU, with torch's deterministic
algorithms: the same data and seed give the same model.

Training needs the `train` extra (torch, sentence-transformers, onnx); what it
writes runs on ONNX Runtime alone (`services/common/embedding.py`).
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from costmesh_tools.cache import calibration
from costmesh_tools.cache.intents import Example, IntentSet, load_intents
from costmesh_tools.cache.pairs import Triplet, batches, nearest_intents, triplets
from costmesh_tools.cache.stock import minilm_dir
from services.common.embedding import (
    MINILM,
    MINILM_MAX_TOKENS,
    MODEL_FILE,
    MODEL_FORMAT,
    ONNX_OPSET,
    SentenceEncoder,
)

log = logging.getLogger(__name__)

BATCH = 64
LEARNING_RATE = 3e-5
SCALE = 20.0
WARMUP_SHARE = 0.1
# Tokens read per question while training: a support question fits (Banking77's
# longest is about 80), and a batch padded to 256 would cost four times the time.
TRAIN_MAX_TOKENS = 64
FORWARD_CHUNK = 32


@dataclass(frozen=True)
class TrainOptions:
    data_sets: tuple[str, ...]
    data_dir: Path
    out: Path
    name: str = "costmesh-qa-minilm"
    seed: int = 0
    epochs: int = 1
    max_examples: int = 0  # 0: every training question (a small number: a quick check)
    quantise: bool = True
    threads: int = 0  # 0: every core


def labelled(sets: Sequence[IntentSet], part: str) -> list[Example]:
    """The named split of every set, intents prefixed by their set so they never merge."""
    return [Example(e.text, f"{s.name}:{e.label}") for s in sets for e in getattr(s, part)]


def train(options: TrainOptions) -> dict[str, Any]:
    """Train, export and calibrate; returns the model card written beside the model."""
    import torch  # noqa: PLC0415 - the train extra

    started = time.monotonic()
    _seed(options.seed)
    torch.set_num_threads(options.threads or os.cpu_count() or 1)
    sets = [load_intents(n, options.data_dir, options.seed) for n in options.data_sets]
    examples = labelled(sets, "train")
    if options.max_examples:
        examples = random.Random(options.seed).sample(
            examples, min(options.max_examples, len(examples))
        )
    model = _load_base()
    neighbours = nearest_intents(examples, _encode(model, [e.text for e in examples]))
    made = triplets(examples, neighbours, options.seed)
    steps = _fine_tune(model, made, options)
    options.out.mkdir(parents=True, exist_ok=True)
    onnx_path = options.out / MODEL_FILE
    _export(model, onnx_path, quantise=options.quantise)
    shutil.copyfile(minilm_dir() / "tokenizer.json", options.out / "tokenizer.json")
    card: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "name": options.name,
        "base": MINILM,
        "dimensions": 384,
        "weights": "int8 embeddings, float16 matrices" if options.quantise else "float32",
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "training": {
            "data": list(options.data_sets),
            "seed": options.seed,
            "epochs": options.epochs,
            "examples": len(examples),
            "triplets": len(made),
            "steps": steps,
            "batch": BATCH,
            "learning_rate": LEARNING_RATE,
            "seconds": round(time.monotonic() - started),
        },
    }
    return recalibrate(options.out, card, sets)


def recalibrate(folder: Path, card: dict[str, Any], sets: Sequence[IntentSet]) -> dict[str, Any]:
    """Measure the folder's model on the validation splits of `sets` and write its card
    with the thresholds each false-hit budget allows."""
    encoder = SentenceEncoder.from_files(folder / MODEL_FILE, folder / "tokenizer.json", "")
    card = {**card, "thresholds": calibration.calibrate(encoder.embed_vectors, sets)}
    (folder / "model.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def _seed(seed: int) -> None:
    import torch  # noqa: PLC0415

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def _load_base() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    return SentenceTransformer(str(minilm_dir()), device="cpu")


def _encode(model: Any, texts: Sequence[str]) -> np.ndarray[Any, np.dtype[np.float32]]:
    vectors = model.encode(
        list(texts),
        batch_size=128,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32)


def _fine_tune(model: Any, made: Sequence[Triplet], options: TrainOptions) -> int:
    import torch  # noqa: PLC0415

    optimiser = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    plan = [b for _ in range(options.epochs) for b in batches(made, BATCH) if len(b) > 1]
    warmup = max(1, int(len(plan) * WARMUP_SHARE))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1 - step / max(len(plan), 1)),
    )
    model.max_seq_length = TRAIN_MAX_TOKENS
    model.train()
    for step, batch in enumerate(plan):
        texts = (
            [t.anchor for t in batch] + [t.positive for t in batch] + [t.negative for t in batch]
        )
        vectors = _forward(model, texts)
        size = len(batch)
        anchors, candidates = vectors[:size], vectors[size:]
        scores = anchors @ candidates.T * SCALE
        # A candidate of the anchor's own intent (other than its positive) is no negative.
        labels = [t.anchor_label for t in batch] + [t.negative_label for t in batch]
        mask = torch.tensor(
            [
                [labels[j] == t.anchor_label and j != i for j in range(2 * size)]
                for i, t in enumerate(batch)
            ]
        )
        scores = scores.masked_fill(mask, float("-inf"))
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(size))
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
        if step % 20 == 0:
            log.info("step %d of %d: loss %.4f", step, len(plan), loss.item())
    model.eval()
    model.max_seq_length = MINILM_MAX_TOKENS
    return len(plan)


def _forward(model: Any, texts: Sequence[str]) -> Any:
    """Unit vectors of `texts`, run in chunks of similar length: padding every text
    to the batch's longest would cost several times the compute."""
    import torch  # noqa: PLC0415

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = []
    for start in range(0, len(order), FORWARD_CHUNK):
        chunk = [texts[i] for i in order[start : start + FORWARD_CHUNK]]
        parts.append(model(model.preprocess(chunk))["sentence_embedding"])
    vectors = torch.empty_like(torch.cat(parts))
    vectors[torch.tensor(order)] = torch.cat(parts)
    return torch.nn.functional.normalize(vectors, dim=-1)


def _export(model: Any, path: Path, *, quantise: bool) -> None:
    """The transformer, mean pooling and normalisation in one graph, then int8."""
    import torch  # noqa: PLC0415

    bert = model[0].auto_model

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
            return torch.nn.functional.normalize(pooled, dim=-1)

    example = torch.ones((1, 8), dtype=torch.int64)
    dynamic = {0: "batch", 1: "tokens"}
    plain = path.with_suffix(".fp32.onnx") if quantise else path
    with warnings.catch_warnings():  # the TorchScript exporter is exact for this graph
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pooled().eval(),
            (example, example),
            str(plain),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": dynamic,
                "attention_mask": dynamic,
                "embedding": {0: "batch"},
            },
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    if quantise:
        _shrink(plain, path)
        plain.unlink()


def _shrink(plain: Path, path: Path) -> None:
    """Int8 embedding tables and float16 matrix weights, computed in float32.

    Fully dynamic int8 (activations too) would be smaller still, but it scales each
    run's activations by that run's range: the same question embedded alone or beside
    others moved by up to 0.03 in cosine, which would decide hits by batch-mates.
    Here only stored weights shrink (90 MB to about 33 MB); ONNX Runtime folds the
    casts once at load, so a vector depends on its text alone and runs as fast as
    float32."""
    import onnx  # noqa: PLC0415 - the train extra
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    gathered = path.with_suffix(".gather.onnx")
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))  # the quantiser logs every tensor
    try:
        quantize_dynamic(
            str(plain), str(gathered), weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"]
        )
    finally:
        quiet.setLevel(level)
    model = onnx.load(str(gathered))
    graph = model.graph
    initialisers = {t.name: t for t in graph.initializer}
    weights = sorted(
        {n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in initialisers}
    )
    casts = []
    for name in weights:
        tensor = initialisers[name]
        if tensor.data_type != TensorProto.FLOAT:
            continue
        half = numpy_helper.from_array(
            numpy_helper.to_array(tensor).astype(np.float16), f"{name}_fp16"
        )
        graph.initializer.remove(tensor)
        graph.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT))
    for node in reversed(casts):
        graph.node.insert(0, node)
    onnx.save(model, str(path))
    gathered.unlink()


def export_stock(path: Path) -> None:
    """Stock all-MiniLM-L6-v2 in the same graph shape as the shipped model (fp32)."""
    _export(_load_base(), path, quantise=False)
