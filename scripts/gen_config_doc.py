"""Write the key reference of docs/configuration.md from services/common/defaults.toml.

The embedded defaults are the one source of every key, its default and what it means
(its comments); the document carries them verbatim between two markers, so they never
drift apart (`make check-generated`)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = ROOT / "services" / "common" / "defaults.toml"
DOC = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- generated from services/common/defaults.toml by `make generate`: do not edit -->"
END = "<!-- end of the generated reference -->"


def reference() -> str:
    return f"{BEGIN}\n\n```toml\n{DEFAULTS.read_text(encoding='utf-8').rstrip()}\n```\n\n{END}"


def main() -> int:
    text = DOC.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        print(f"{DOC}: the markers of the generated reference are missing", file=sys.stderr)
        return 1
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    DOC.write_text(before + reference() + after, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
