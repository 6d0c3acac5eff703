"""Debian's headless Chromium for tests that look at a page: its DOM, what it said on
its console, and a screenshot; kept off the network."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.unavailable import unavailable

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "apt-get install -y --no-install-recommends chromium"
REPO = Path(__file__).resolve().parent.parent
# Chromium logs every console message of a page (log, warning, error, a blocked fetch,
# an uncaught exception) to stderr as "...:INFO:CONSOLE:0] "text", source: ...".
_CONSOLE = re.compile(r":CONSOLE[:(]")
_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
    # Any host name resolves to nothing, so a page that tried to fetch could not.
    "--host-resolver-rules=MAP * ~NOTFOUND",
)  # fmt: skip


@dataclass(frozen=True)
class Visit:
    output: str  # stdout: the DOM with --dump-dom
    console: list[str]  # the page's console messages


def artifacts_dir() -> Path:
    """Where tests leave files for people to look at: $COSTMESH_TEST_ARTIFACTS, else
    .test-artifacts/ in the repository."""
    path = Path(os.environ.get("COSTMESH_TEST_ARTIFACTS") or REPO / ".test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def chromium() -> Path:
    """Chromium; skips (fails under CI=true) when it is not installed."""
    if not CHROMIUM.exists():
        unavailable(f"Chromium is not installed at {CHROMIUM} (install it: {INSTALL})")
    return CHROMIUM


def visit(page: Path, *flags: str) -> Visit:
    """Open a local page in headless Chromium with a new, empty profile."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        done = subprocess.run(
            [str(chromium()), *_FLAGS, f"--user-data-dir={profile}", *flags, page.as_uri()],
            capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"chromium exited {done.returncode}:\n{done.stderr[-4000:]}")
    console = [line for line in done.stderr.splitlines() if _CONSOLE.search(line)]
    return Visit(done.stdout, console)
