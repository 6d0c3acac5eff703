"""Canonical request hashing: equal requests get equal keys, whatever the field order."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestKey:
    """Everything that makes two requests share an answer.

    `partition` never enters what is compared for meaning: it is the hard boundary
    (team, feature, namespace, namespace version, scope) inside which entries live.
    """

    team: str
    feature: str
    namespace: str
    scope_key: str
    model: str
    messages: tuple[tuple[int, str], ...]
    params: tuple[tuple[str, object], ...]

    def partition(self, namespace_version: int) -> tuple[str, str, str, int, str]:
        return (self.team, self.feature, self.namespace, namespace_version, self.scope_key)

    def digest(self, namespace_version: int) -> str:
        """SHA-256 of the canonical JSON of the key and the namespace version."""
        canonical = json.dumps(
            {
                "partition": list(self.partition(namespace_version)),
                "model": self.model,
                "messages": [list(m) for m in self.messages],
                "params": [list(p) for p in self.params],
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()
