"""Equivalence models for the semantic cache, measured against each other.

Candidates (all on the same training triplets, thresholds from validation splits,
figures on test splits, in-domain):
- stock all-MiniLM-L6-v2, cosine, one threshold;
- a linear adapter on frozen MiniLM vectors (a 384x384 matrix, identity at start,
  trained with the same multiple-negatives loss as the fine-tune);
- full contrastive fine-tuning of MiniLM (a model folder `costmesh cache train` wrote);
- each of them with the guard judging the top 4 candidates in turn (as the cache
  does) or only the nearest one.

    .venv/bin/python bench/equivalence_candidates.py --model services/common/embedding_model

Needs the train extra (torch) for the adapter and stock MiniLM.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from costmesh_tools.cache import calibration
from costmesh_tools.cache.intents import (
    DATA_SETS,
    IntentSet,
    default_data_dir,
    load_intents,
    unique,
)
from costmesh_tools.cache.pairs import batches, nearest_intents, triplets
from costmesh_tools.cache.stock import minilm_encoder
from costmesh_tools.cache.training import BATCH, SCALE, labelled
from services.common.embedding import SentenceEncoder, embed_sorted

Matrix = npt.NDArray[np.float32]


def adapter(encode: Callable[[Sequence[str]], Matrix], sets: Sequence[IntentSet]) -> Matrix:
    """A linear map trained on frozen vectors with the fine-tune's loss and batches."""
    import torch  # noqa: PLC0415

    torch.manual_seed(0)
    examples = labelled(sets, "train")
    texts = sorted({e.text for e in examples})
    index = {t: i for i, t in enumerate(texts)}
    frozen = torch.from_numpy(embed_sorted(encode, texts))
    vectors = frozen[[index[e.text] for e in examples]].numpy()
    made = [t for t in triplets(examples, nearest_intents(examples, vectors), 0)
            if t.negative in index and t.anchor in index]  # fmt: skip
    weight = torch.nn.Parameter(torch.eye(frozen.shape[1]))
    optimiser = torch.optim.AdamW([weight], lr=1e-3, weight_decay=0.0)
    for batch in batches(made, BATCH):
        size = len(batch)
        rows = [index[t.anchor] for t in batch] + [index[t.positive] for t in batch]
        rows += [index[t.negative] for t in batch]
        mapped = torch.nn.functional.normalize(frozen[rows] @ weight, dim=-1)
        scores = mapped[:size] @ mapped[size:].T * SCALE
        labels = [t.anchor_label for t in batch] + [t.negative_label for t in batch]
        mask = torch.tensor([[labels[j] == t.anchor_label and j != i for j in range(2 * size)]
                             for i, t in enumerate(batch)])  # fmt: skip
        loss = torch.nn.functional.cross_entropy(
            scores.masked_fill(mask, float("-inf")), torch.arange(size)
        )
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        optimiser.zero_grad()
    result: Matrix = weight.detach().numpy()
    return result


def measure(name: str, embed: calibration.Embed, sets: Sequence[IntentSet], k: int) -> None:
    started = time.perf_counter()
    judged_val = []
    judged_test = []
    for s in sets:
        stored = unique(s.train)
        judged_val.append(
            calibration.judge(embed, stored, calibration.semantic_queries(stored, s.validation), k)
        )
        judged_test.append(
            (
                s,
                stored,
                calibration.judge(embed, stored, calibration.semantic_queries(stored, s.test), k),
            )
        )
    pooled = [j for judged in judged_val for j in judged]  # as calibration.calibrate does
    threshold = calibration.operating_threshold(pooled, 0.01)
    cells = []
    for s, stored, judged in judged_test:
        p = calibration.point(judged, threshold, {e.label for e in stored})
        oos = f" oos {100 * p.oos_rate:.2f}%" if p.oos_queries else ""
        cells.append(
            f"{s.name}: recall {100 * p.recall:.1f}% false/hit {100 * p.false_per_hit:.2f}%{oos}"
        )
    print(
        f"| {name} | {threshold:.3f} | "
        + " | ".join(cells)
        + f" | {time.perf_counter() - started:.0f} s |"
    )


def remembered(embed: calibration.Embed) -> calibration.Embed:
    """Each text embedded once, however many candidates are judged on it."""
    seen: dict[str, npt.NDArray[np.float32]] = {}

    def cached(texts: Sequence[str]) -> Matrix:
        new = [t for t in dict.fromkeys(texts) if t not in seen]
        if new:
            seen.update(zip(new, embed(new), strict=True))
        return np.stack([seen[t] for t in texts])

    return cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a fine-tuned model folder")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    sets = [load_intents(n, args.data_dir) for n in DATA_SETS]
    stock = remembered(minilm_encoder(threads).embed_vectors)
    tuned = remembered(SentenceEncoder.from_dir(args.model, threads).embed_vectors)
    print("| candidate | threshold (1%, validation) | " + " | ".join(DATA_SETS) + " | time |")
    print("|---|---|" + "---|" * len(DATA_SETS) + "---|")
    measure("stock MiniLM, guard on nearest", stock, sets, 1)
    measure("stock MiniLM, guard on top 4", stock, sets, 4)
    weight = adapter(stock, sets)

    def adapted(texts: Sequence[str]) -> Matrix:
        mapped = stock(texts) @ weight
        normed: Matrix = mapped / np.linalg.norm(mapped, axis=1, keepdims=True)
        return normed

    measure("linear adapter on frozen MiniLM, top 4", adapted, sets, 4)
    measure("fine-tuned MiniLM, guard on nearest", tuned, sets, 1)
    measure("fine-tuned MiniLM, guard on top 4", tuned, sets, 4)


if __name__ == "__main__":
    main()
