"""Where a call's CPU goes: one costmesh gateway, as `gateway.py` runs it, profiled.

Starts the fake provider and `costmesh serve` (the feature of --feature), asks --calls
new questions one at a time (misses) or one question again (--hits), prints the
gateway process's CPU per call and, with py-spy installed (`pip install py-spy`), a
sampled profile of the same calls: each function's inclusive milliseconds per call,
largest first. py-spy samples the Python threads that are not idle (one waiting for
the GIL counts as busy) and not gRPC's own C threads, so its figures and the CPU
figure need not agree (and it assumes py-spy kept up its 1,000 samples a second): read
it for where the time goes, the CPU figure for how much.

    .venv/bin/python bench/gateway_profile.py --calls 700
    .venv/bin/python bench/gateway_profile.py --hits --calls 3000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from gateway import PROVIDER_KEY, PROVIDER_SCRIPT, _costmesh, _cpu_seconds, _process

# py-spy's raw format: "frame;frame;... count", each frame "function (file:line)".
FRAME = re.compile(r"(?P<function>.*?) \((?P<file>.*?)(?::\d+)?\)$")
SAMPLES_PER_SECOND = 1000


def _short(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame
    file = match["file"].split("/site-packages/")[-1].replace(str(Path.cwd()) + "/", "")
    return f"{match['function']} ({file})"


def inclusive_ms(raw: Path, calls: int) -> list[tuple[str, float]]:
    """Each function's samples, counted once per stack it is on, in ms per call."""
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        for name in {_short(f) for f in stack.split(";")}:
            totals[name] += int(count)
    per_call = 1000 / SAMPLES_PER_SECOND / calls
    return [(name, n * per_call) for name, n in totals.most_common()]


@contextlib.asynccontextmanager
async def _recording(spy: str, pid: int, raw: Path) -> AsyncIterator[None]:
    """py-spy sampling `pid` into `raw` for the duration; stopped (SIGINT, so it writes
    what it has) however the block ends. Raises with py-spy's own words if it wrote
    nothing (it needs the right to trace the process: root, or ptrace allowed)."""
    errors = raw.with_suffix(".err")
    with errors.open("wb") as stderr:
        recorder = subprocess.Popen(  # noqa: ASYNC220 - runs beside the calls, stopped below
            [spy, "record", "--pid", str(pid), "--rate", str(SAMPLES_PER_SECOND),
             "--format", "raw", "--nonblocking", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        try:
            await asyncio.sleep(1.5)  # py-spy attaches
            yield
        finally:
            recorder.send_signal(signal.SIGINT)
            try:
                await asyncio.to_thread(recorder.wait, 30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                await asyncio.to_thread(recorder.wait)
    if not await asyncio.to_thread(raw.exists):
        said = await asyncio.to_thread(errors.read_text)
        raise SystemExit(f"py-spy wrote no profile: {said.strip()[-500:]}")


async def profile(feature: str, calls: int, hits: bool, top: int) -> None:
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=Path(sys.executable).parent)
    env = {**os.environ, "COSTMESH_LOG_LEVEL": "WARNING"}
    argv = (sys.executable, "-c", PROVIDER_SCRIPT, PROVIDER_KEY)
    async with _process(*argv, env=env, ready="http") as (_, provider):
        with tempfile.TemporaryDirectory() as data_dir:
            async with _costmesh(provider, data_dir, feature) as gateway:
                for i in range(30):  # warm-up: model sessions, connections
                    await gateway.ask(10**7 + i)
                if hits and not await gateway.ask(10**7):
                    raise SystemExit(f"feature {feature!r} does not cache: no hits to profile")
                numbers = [10**7] * calls if hits else list(range(calls))
                raw = Path(data_dir) / "profile.raw"
                async with contextlib.AsyncExitStack() as stack:
                    if spy:
                        await stack.enter_async_context(_recording(spy, gateway.pid, raw))
                    cpu, wall = _cpu_seconds(gateway.pid), time.perf_counter()
                    for i in numbers:
                        await gateway.ask(i)
                    cpu, wall = _cpu_seconds(gateway.pid) - cpu, time.perf_counter() - wall
                kind = "exact hit" if hits else "miss"
                print(f"costmesh {feature}: {cpu / calls * 1000:.2f} ms CPU per {kind}, "
                      f"{wall / calls * 1000:.2f} ms per call at 1 caller")  # fmt: skip
                if not spy:
                    print("py-spy is not installed: no profile (pip install py-spy)")
                    return
                print("| ms per call | function (inclusive) |\n|---:|---|")
                for name, ms in inclusive_ms(raw, calls)[:top]:
                    print(f"| {ms:.2f} | {name} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feature", default="default", choices=("default", "plain"))
    parser.add_argument("--calls", type=int, default=700)
    parser.add_argument("--hits", action="store_true", help="one question again: exact hits")
    parser.add_argument("--top", type=int, default=40, help="functions to print")
    args = parser.parse_args()
    asyncio.run(profile(args.feature, args.calls, args.hits, args.top))


if __name__ == "__main__":
    main()
