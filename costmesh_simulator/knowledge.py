"""The questions a realistic simulator knows: a JSONL workload (optionally gzipped) read for
its reference answers.

Each line is a JSON object with `messages` (the chat request; its last user message is
the question) and optionally `reference` (the right answer), `tier` (simple, moderate or
complex) and `label` (the intent). Other keys are the workload's business and are ignored.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from costmesh_simulator.wire import content_text

TIERS = ("simple", "moderate", "complex")
_SYSTEM_ROLES = ("system", "developer")


class KnowledgeError(ValueError):
    """A knowledge file that cannot be read; the message names the file and the line
    (`path:line: field: why`, as the workload format and the router's data say it)."""


@dataclass(frozen=True)
class Entry:
    """What the simulator knows of one question."""

    conversation: tuple[str, ...]  # every message's text, the question among them
    question: str
    instructions: str  # the system messages: what kind of answer is wanted
    reference: str  # "" when the line gives none
    tier: str  # "" when the line gives none
    label: str


def _key(texts: Sequence[str]) -> str:
    """Texts match regardless of case and spacing, as a replayed ticket may differ in both."""
    return "\0".join(" ".join(text.split()).casefold() for text in texts)


class Knowledge:
    """Known questions, and the reference answers to draw wrong ones from.

    A request is matched on its whole conversation first (the same question may be asked
    for a classification and for a drafted reply), then on its question alone.
    """

    def __init__(self, entries: Sequence[Entry] = (), source: str = "") -> None:
        self.source = source
        self._by_conversation: dict[str, Entry] = {}
        self._by_question: dict[str, Entry] = {}
        answers: dict[str, set[tuple[str, str]]] = {}
        for entry in entries:
            # A workload repeats questions (that is what the cache is for): the first wins.
            self._by_conversation.setdefault(_key(entry.conversation), entry)
            self._by_question.setdefault(_key([entry.question]), entry)
            if entry.reference:
                answers.setdefault(entry.instructions, set()).add((entry.label, entry.reference))
        self._answers = {instructions: sorted(pairs) for instructions, pairs in answers.items()}

    @classmethod
    def load(cls, path: str | Path) -> Knowledge:
        """Read a .jsonl or .jsonl.gz workload; KnowledgeError names the file and the
        first bad line."""
        try:
            raw = Path(path).read_bytes()
            text = (gzip.decompress(raw) if str(path).endswith(".gz") else raw).decode()
        except OSError as exc:
            reason = exc.strerror or str(exc)  # gzip's errors carry no strerror
            raise KnowledgeError(f"cannot read {path}: {reason}") from None
        except (EOFError, zlib.error, UnicodeDecodeError):
            raise KnowledgeError(f"cannot read {path}: damaged gzip or not UTF-8 text") from None
        entries = [
            _entry(line, f"{path}:{number}")
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
        return cls(entries, str(path))

    def __len__(self) -> int:
        return len(self._by_conversation)

    def find(self, conversation: Sequence[str], question: str) -> Entry | None:
        """The entry for a request's message texts, else for its last user message."""
        found = self._by_conversation.get(_key(conversation))
        return found or self._by_question.get(_key([question]))

    def other_answer(self, entry: Entry, draw: float) -> str | None:
        """Another reference answer given under the same instructions, of another intent
        when the lines are labelled, picked by `draw` in [0, 1); None if there is none."""
        answers = self._answers.get(entry.instructions, [])
        start = int(draw * len(answers))
        for step in range(len(answers)):
            label, reference = answers[(start + step) % len(answers)]
            same_intent = bool(entry.label) and label == entry.label
            if reference != entry.reference and not same_intent:
                return reference
        return None


def _entry(line: str, where: str) -> Entry:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise KnowledgeError(f"{where}: not JSON: {exc.msg}") from None
    if not isinstance(item, dict):
        raise KnowledgeError(f"{where}: expected a JSON object")
    messages = _messages(item.get("messages"))
    question = next((text for role, text in reversed(messages) if role == "user"), "")
    if not question.strip():
        raise KnowledgeError(
            f"{where}: messages: expected an array of {{role, content}} objects "
            "with a non-empty user message"
        )
    # Optional keys may be absent or null.
    reference, label, tier = item.get("reference") or "", item.get("label") or "", item.get("tier")
    for name, value in (("reference", reference), ("label", label)):
        if not isinstance(value, str):
            raise KnowledgeError(f"{where}: {name}: expected a string, got {value!r}")
    if tier is not None and tier not in TIERS:
        raise KnowledgeError(f"{where}: tier: expected one of {', '.join(TIERS)}, got {tier!r}")
    return Entry(
        conversation=tuple(text for _, text in messages),
        question=question,
        instructions="\n".join(text for role, text in messages if role in _SYSTEM_ROLES),
        reference=reference,
        tier=tier or "",
        label=label,
    )


def _messages(messages: object) -> list[tuple[str, str]]:
    """(role, text) of each message; empty when `messages` is not a valid array."""
    if not isinstance(messages, list):
        return []
    out = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        text = content_text(message.get("content")) if isinstance(message, dict) else None
        if not isinstance(role, str) or text is None:
            return []
        out.append((role, text))
    return out
