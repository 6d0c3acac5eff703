"""docs/errors.md lists every ErrorInfo reason the services can send, and no other."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def raised_reasons() -> set[str]:
    pattern = re.compile(r'\breason\s*=\s*"([A-Z][A-Z_]+)"')
    return {
        reason
        for path in (ROOT / "services").rglob("*.py")
        for reason in pattern.findall(path.read_text(encoding="utf-8"))
    }


def catalogued_reasons() -> set[str]:
    text = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    return set(re.findall(r"(?m)^\| `([A-Z][A-Z_]+)` \|", text))


def test_every_reason_the_code_raises_is_catalogued_and_none_is_stale() -> None:
    raised = raised_reasons()
    assert len(raised) >= 20  # the scan found the reasons, not nothing
    assert raised == catalogued_reasons()
