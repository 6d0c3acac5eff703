"""CPU per embedded question for the shipped equivalence model: ONNX Runtime thread and
spinning settings, and the int8 candidates that were measured and refused.

threads  one question at a time (as a lone request is embedded), 2 ms apart: CPU
         (process time) and wall time per question, 1 or 2 intra-op threads, spinning
         on or off.
int8     dynamic int8 quantisation of the shipped model's MatMuls (per channel; every
         one, or with --matrices ffn only the feed-forward ones), written to --out:
         its speed and its cosine to the shipped vectors, then its thresholds
         recalibrated on the validation splits and `costmesh cache eval --setting
         in-domain` on it (about 10 minutes). Dynamic int8 scales activations per run,
         so every text here is embedded in a run of its own, as serving would have to.
bf16     the shipped model at bfloat16 through ONNX Runtime's OpenVINO provider (AMX
         on this CPU), measured and not adopted: CPU and wall per question by length,
         beside the CPU provider on 1 and 2 threads, and the cosine to its vectors. It
         needs `onnxruntime-openvino` in place of `onnxruntime` (the two packages
         share a module), so it runs from a venv of its own:
             python3 -m venv /tmp/ov && /tmp/ov/bin/pip install -e .
             /tmp/ov/bin/pip uninstall -y onnxruntime
             /tmp/ov/bin/pip install onnxruntime-openvino==1.24.1
             /tmp/ov/bin/python bench/embedding_cpu.py bf16 --questions 1000

    .venv/bin/python bench/embedding_cpu.py threads
    .venv/bin/python bench/embedding_cpu.py int8 --out .costmesh/int8-model
    .venv/bin/python bench/embedding_cpu.py int8 --matrices ffn --out .costmesh/int8-ffn
    /tmp/ov/bin/python bench/embedding_cpu.py bf16 --questions 1000
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime

from services.common.embedding import MODEL_FILE, SHIPPED_MODEL_DIR, Embeddings, SentenceEncoder

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "banking77"


def _questions(count: int) -> list[str]:
    with (DATA / "test.csv").open(newline="") as fh:
        return [row["text"] for row in csv.DictReader(fh)][:count]


def _encoder(
    model: Path,
    threads: int,
    spinning: bool,
    provider: str | tuple[str, dict[str, str]] = "CPUExecutionProvider",
) -> SentenceEncoder:
    encoder = SentenceEncoder.from_dir(SHIPPED_MODEL_DIR, threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    encoder._session = onnxruntime.InferenceSession(str(model), options, providers=[provider])
    return encoder


def _per_question(encoder: SentenceEncoder, texts: list[str]) -> tuple[float, float]:
    """CPU and wall milliseconds per question, one question per run, 2 ms apart."""
    for text in texts[:20]:
        encoder.embed_sync([text])
    pause = 0.002
    cpu, wall = time.process_time(), time.perf_counter()
    for text in texts:
        encoder.embed_sync([text])
        time.sleep(pause)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall - pause * len(texts)
    return cpu / len(texts) * 1000, wall / len(texts) * 1000


def threads(count: int) -> None:
    texts = _questions(count)
    model = SHIPPED_MODEL_DIR / MODEL_FILE
    print("| threads | spinning | CPU ms per question | wall ms per question |")
    print("|---:|---|---:|---:|")
    for n, spinning in ((1, True), (1, False), (2, True), (2, False)):
        cpu, wall = _per_question(_encoder(model, n, spinning), texts)
        print(f"| {n} | {'on' if spinning else 'off'} | {cpu:.2f} | {wall:.2f} |")


# OpenVINO's CPU plugin computes in bfloat16 where the CPU has the units for it.
OPENVINO_BF16 = (
    "OpenVINOExecutionProvider",
    {
        "device_type": "CPU",
        "load_config": json.dumps(
            {
                "CPU": {
                    "INFERENCE_PRECISION_HINT": "bf16",
                    "INFERENCE_NUM_THREADS": "1",
                    "NUM_STREAMS": "1",
                }
            }
        ),
    },
)
LENGTHS = ((0, 16), (16, 32), (32, 48), (48, 257))


def bf16(count: int) -> None:
    if "OpenVINOExecutionProvider" not in onnxruntime.get_available_providers():
        raise SystemExit(
            "bf16 needs onnxruntime-openvino in place of onnxruntime: "
            "see the docstring of bench/embedding_cpu.py"
        )
    model = SHIPPED_MODEL_DIR / MODEL_FILE
    texts = _questions(count)
    encoders = {
        "CPU provider, 1 thread": _encoder(model, 1, False),
        "CPU provider, 2 threads spinning": _encoder(model, 2, True),
        "OpenVINO bf16, 1 thread": _encoder(model, 1, False, OPENVINO_BF16),
    }
    alone = [encoders["CPU provider, 1 thread"].embed_sync([t]) for t in texts]
    tokens = [e.input_tokens for e in alone]
    shipped = np.vstack([e.vectors for e in alone])
    bf16_vectors = np.vstack(
        [encoders["OpenVINO bf16, 1 thread"].embed_sync([t]).vectors for t in texts]
    )
    cosine = (shipped * bf16_vectors).sum(axis=1)
    print(f"bf16 cosine to the shipped vectors: min {cosine.min():.5f}, mean {cosine.mean():.5f}")
    print("| tokens | questions | " + " | ".join(f"{n}: CPU / wall ms" for n in encoders) + " |")
    print("|---|---:|" + "---:|" * len(encoders))
    for low, high in LENGTHS:
        group = [t for t, n in zip(texts, tokens, strict=True) if low < n <= high]
        if not group:
            continue
        cells = [_per_question(e, group) for e in encoders.values()]
        label = f"{low + 1}-{high}" if high < 257 else f"over {low}"
        print(
            f"| {label} | {len(group)} | "
            + " | ".join(f"{c:.2f} / {w:.2f}" for c, w in cells)
            + " |"
        )


FEED_FORWARD = re.compile(r"layer\.\d+/(intermediate|output)/dense/MatMul$")


def int8(count: int, out: Path, matrices: str) -> None:
    import onnx  # noqa: PLC0415 - the train extra
    from onnx import numpy_helper  # noqa: PLC0415
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    from costmesh_tools import cli  # noqa: PLC0415
    from costmesh_tools.cache import intents, training  # noqa: PLC0415

    graph = onnx.load(str(SHIPPED_MODEL_DIR / MODEL_FILE))
    stored = {t.name: t for t in graph.graph.initializer}
    for node in list(graph.graph.node):  # float16 weights back to float32, casts gone
        if node.op_type == "Cast" and node.input[0] in stored:
            weights = numpy_helper.to_array(stored[node.input[0]]).astype(np.float32)
            graph.graph.initializer.remove(stored[node.input[0]])
            graph.graph.initializer.append(numpy_helper.from_array(weights, node.output[0]))
            graph.graph.node.remove(node)
    out.mkdir(parents=True, exist_ok=True)
    plain = out / "float32.onnx"
    onnx.save(graph, str(plain))
    chosen = [
        n.name for n in graph.graph.node
        if n.op_type == "MatMul" and (matrices == "all" or FEED_FORWARD.search(n.name))
    ]  # fmt: skip
    quantize_dynamic(
        str(plain), str(out / MODEL_FILE), weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"], nodes_to_quantize=chosen, per_channel=True,
    )  # fmt: skip
    plain.unlink()
    shutil.copyfile(SHIPPED_MODEL_DIR / "tokenizer.json", out / "tokenizer.json")
    texts = _questions(count)
    shipped = _encoder(SHIPPED_MODEL_DIR / MODEL_FILE, 1, True)
    candidate = _encoder(out / MODEL_FILE, 1, True)
    for name, encoder in (("shipped", shipped), ("int8", candidate)):
        cpu, wall = _per_question(encoder, texts)
        print(f"{name}: {cpu:.2f} ms CPU, {wall:.2f} ms wall per question")
    ours = np.vstack([shipped.embed_sync([t]).vectors for t in texts])
    theirs = np.vstack([candidate.embed_sync([t]).vectors for t in texts])
    cosine = (ours * theirs).sum(axis=1)
    print(f"cosine to the shipped vectors: min {cosine.min():.4f}, mean {cosine.mean():.4f}")
    card = json.loads((SHIPPED_MODEL_DIR / "model.json").read_text())
    card["name"] = "int8-candidate"
    card["weights"] = f"dynamic int8 matrices (per channel; {matrices})"
    card["onnx_sha256"] = hashlib.sha256((out / MODEL_FILE).read_bytes()).hexdigest()
    one_per_run = SentenceEncoder.embed_sync
    SentenceEncoder.embed_sync = lambda self, texts: _stacked(one_per_run, self, texts)  # type: ignore[method-assign]
    sets = [intents.load_intents(n, DATA.parent) for n in ("banking77", "clinc150", "bitext")]
    training.recalibrate(out, card, sets)
    print(f"recalibrated thresholds written to {out / 'model.json'}", flush=True)
    cli.main(
        ["cache", "eval", "--setting", "in-domain", "--models", str(out), "--format", "markdown"]
    )


def _stacked(
    embed: Callable[[SentenceEncoder, Sequence[str]], Embeddings],
    encoder: SentenceEncoder,
    texts: Sequence[str],
) -> Embeddings:
    """Each text in a run of its own, stacked as one batch's result."""
    parts = [embed(encoder, [text]) for text in texts]
    if not parts:
        return embed(encoder, [])
    return Embeddings(
        np.vstack([p.vectors for p in parts]),
        sum(p.input_tokens for p in parts),
        tuple(t for p in parts for t in p.truncated),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("threads", "int8", "bf16"))
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(".costmesh/int8-model"))
    parser.add_argument("--matrices", choices=("all", "ffn"), default="all")
    args = parser.parse_args()
    if args.mode == "threads":
        threads(args.questions)
    elif args.mode == "bf16":
        bf16(args.questions)
    else:
        int8(args.questions, args.out, args.matrices)


if __name__ == "__main__":
    main()
