"""The second opinion on a semantic candidate: a cross-encoder that reads the question
and a stored one together and gives the probability they ask the same thing.

The embedding finds candidates cheaply; this decides. A question's candidates are
scored in one run; the weights compute in float32 and padding is masked, so a pair's
score does not depend on the candidates beside it (beyond float rounding)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.common.embedding import MODEL_FILE, ModelError

VERIFIER_FORMAT = "costmesh-verifier-model/1"
VERIFIER_MAX_TOKENS = 128  # both questions together; a longer pair is cut, longest first
SHIPPED_VERIFIER_DIR = Path(__file__).resolve().parent / "verifier_model"


class PairVerifier:
    """P(same question) for (question, stored question) pairs, on ONNX Runtime."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        import onnxruntime  # noqa: PLC0415
        from tokenizers import Tokenizer  # noqa: PLC0415

        card = read_verifier_card(folder)
        self.model = f"{card['name']}@{str(card['onnx_sha256'])[:12]}"
        self.thresholds = {str(k): float(v) for k, v in card.get("thresholds", {}).items()}
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=VERIFIER_MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 - a token
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"]
        )

    def same(self, question: str, candidates: Sequence[str]) -> list[float]:
        """P(same question) of `question` against each candidate, in their order."""
        if not candidates:
            return []
        encodings = self._tokenizer.encode_batch([(question, c) for c in candidates])
        feed = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        (probability,) = self._session.run(None, feed)
        return [float(p) for p in np.asarray(probability).reshape(-1)]


def read_verifier_card(folder: Path) -> dict[str, Any]:
    path = folder / "model.json"
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: no model card (is {folder} a verifier folder?)") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON: {exc.msg}") from None
    if not isinstance(card, dict) or card.get("format") != VERIFIER_FORMAT:
        raise ModelError(f"{path}: not a {VERIFIER_FORMAT} card")
    for name in (MODEL_FILE, "tokenizer.json"):
        if not (folder / name).is_file():
            raise ModelError(f"{folder / name}: missing from the verifier folder")
    return card
