"""How a cache entry is written to Redis and read back: its hash fields, its event on
the change stream, and the local mirror's record of it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from services.cache.index import Vector
from services.cache.store import Answer, Entry


@dataclass
class Mirrored:
    """What a replica keeps of an entry: enough to search and account for it."""

    partition: str
    feature: str
    namespace: str
    expires_at: float
    nbytes: int
    tags: tuple[str, ...]


def hash_field(*parts: str) -> str:
    return json.dumps(parts, ensure_ascii=False)


def glob_escape(text: str) -> str:
    """SCAN patterns are globs: a prefix with * ? [ or \\ must match only itself."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def event_order(event_id: bytes) -> tuple[int, int]:
    milliseconds, sequence = event_id.split(b"-")
    return int(milliseconds), int(sequence)


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def vector_bytes(vector: Vector | None) -> bytes:
    return b"" if vector is None else np.asarray(vector, dtype=np.float32).tobytes()


def mirror_fields(entry: Entry) -> dict[str, Any]:
    """What replicas need of an entry to mirror it: no question, no answer."""
    return {
        "feature": entry.feature,
        "namespace": entry.namespace,
        "partition": entry.partition,
        "expires_at": entry.expires_at,
        "tags": list(entry.tags),
        "nbytes": entry.nbytes,
    }


def mirror_meta(entry: Entry) -> str:
    return json.dumps(mirror_fields(entry), ensure_ascii=False)


def entry_meta(entry: Entry) -> str:
    whole = mirror_fields(entry) | {
        "question": entry.question,
        "answer": asdict(entry.answer),
        "created_at": entry.created_at,
        "source_request_id": entry.source_request_id,
    }
    return json.dumps(whole, ensure_ascii=False)


def entry_from(entry_id: str, meta: dict[str, Any]) -> Entry:
    """The entry as lookups need it; its vector stays in Redis and the mirror."""
    return Entry(
        entry_id=entry_id,
        feature=meta["feature"],
        namespace=meta["namespace"],
        partition=meta["partition"],
        question=meta["question"],
        answer=Answer(**meta["answer"]),
        created_at=meta["created_at"],
        expires_at=meta["expires_at"],
        tags=tuple(meta["tags"]),
        source_request_id=meta.get("source_request_id", ""),  # absent: stored before it
    )
