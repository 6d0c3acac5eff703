"""A progress bar on stderr for long client runs: redrawn in place on a terminal,
a line every tenth of the way otherwise (CI logs, pipes)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class Progress:
    def __init__(self, label: str, out: TextIO | None = None) -> None:
        self._label = label
        self._out = out or sys.stderr
        self._tty = self._out.isatty()
        self._started = time.monotonic()
        self._last_tenth = -1

    def __call__(self, done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if not self._tty and tenth == self._last_tenth and done < total:
            return
        self._last_tenth = tenth
        elapsed = time.monotonic() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else 0.0
        filled = WIDTH * done // max(total, 1)
        line = (
            f"{self._label} [{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{total}"
            f" {100 * done // max(total, 1):3d}%  {rate:5.1f} req/s  ETA {_clock(left)}"
        )
        end = "\n" if done >= total or not self._tty else ""
        self._out.write(("\r" if self._tty else "") + line + end)
        self._out.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
