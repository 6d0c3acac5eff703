"""Canonical request hashing: equal requests get equal keys, whatever the field order.

Two digests come out of one request. The exact digest covers everything; the
semantic partition covers everything but the question, so a semantic hit can only
ever return an answer to the same conversation, settings, tenant and namespace
version with a question of the same meaning. The partition is a hard boundary of
the vector index: nothing of it is mixed into the text that is embedded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from costmesh.types.v1.types_pb2 import ROLE_USER

QUESTION_MODES = ("last_user", "all_user")


@dataclass(frozen=True)
class RequestKey:
    """Everything that makes two requests share an answer."""

    team: str
    feature: str
    namespace: str
    scope_key: str
    model: str
    messages: tuple[tuple[int, str], ...]
    params: bytes  # deterministic serialisation of GenerationParams: new fields count

    def _question_positions(self, mode: str) -> set[int]:
        users = [i for i, (role, _) in enumerate(self.messages) if role == ROLE_USER]
        if not users:
            return set()
        return set(users) if mode == "all_user" else {users[-1]}

    def question(self, mode: str = "last_user") -> str:
        """The text compared for meaning: the last user message, or all of them."""
        positions = self._question_positions(mode)
        return "\n".join(text for i, (_, text) in enumerate(self.messages) if i in positions)

    def digest(self, namespace_version: int) -> str:
        """SHA-256 of the whole request and the namespace version: the entry id."""
        return _sha256(
            {
                "partition": self._partition(namespace_version),
                "model": self.model,
                "messages": [list(m) for m in self.messages],
                "params": self.params.hex(),
            }
        )

    def semantic_partition(self, namespace_version: int, mode: str, embedding_model: str) -> str:
        """SHA-256 of everything but the question: where a semantic match may come from."""
        positions = self._question_positions(mode)
        return _sha256(
            {
                "partition": self._partition(namespace_version),
                "model": self.model,
                "context": [
                    list(m) if i not in positions else [m[0], None]
                    for i, m in enumerate(self.messages)
                ],
                "params": self.params.hex(),
                "embedding_model": embedding_model,
                "mode": mode,
            }
        )

    def _partition(self, namespace_version: int) -> list[object]:
        return [self.team, self.feature, self.namespace, namespace_version, self.scope_key]


def _sha256(value: object) -> str:
    canonical = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
