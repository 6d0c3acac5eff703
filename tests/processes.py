"""Starting a costmesh service as its own process, the way an operator would."""

from __future__ import annotations

import asyncio
import sys


async def start_service(
    service: str, env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, str]:
    """`costmesh serve <service> --port 0`; returns the process and its address once
    it prints the line saying it serves."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "costmesh_tools.cli", "serve", service, "--port", "0",
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(30):
        while line := (await process.stdout.readline()).decode():
            if line.startswith(f"costmesh: serving {service} on "):
                return process, line.rsplit(" ", 1)[1].strip()
    raise AssertionError(f"{service} exited with {await process.wait()} before serving")
