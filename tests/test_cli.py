"""`costmesh serve` refuses to start on a bad setting with one clear line, never a traceback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


async def _serve(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "costmesh_tools.cli", "serve", *args,
        env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[features.support]\ntier = 'hard'\n", {}, "features.support.tier: expected one of"),
        ("", {"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: unsupported exporter"),
        ("", {"COSTMESH_LOG_LEVEL": "verbose"}, "COSTMESH_LOG_LEVEL: unknown level"),
        ("[server]\ngrace_seconds = -1\n", {}, "server.grace_seconds: must not be negative"),
    ],
    ids=["config key", "exporter", "log level", "grace"],
)
async def test_bad_settings_exit_2_with_one_line_naming_them(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    env = {**env, "COSTMESH_DATA_DIR": str(tmp_path), "COSTMESH_CONFIG": str(config)}

    code, err = await _serve(["--port", "0"], env)

    assert code == 2
    assert f"costmesh: configuration error: {message}" in err
    assert "Traceback" not in err


async def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = await _serve(["--port", str(port)], {"COSTMESH_DATA_DIR": str(tmp_path)})

    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err


async def test_an_unopenable_ledger_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "ledger.sqlite3").mkdir()  # a folder where the database file should be

    code, err = await _serve(["--port", "0"], {"COSTMESH_DATA_DIR": str(tmp_path)})

    assert code == 1
    assert f"cannot open database {tmp_path / 'ledger.sqlite3'}" in err
    assert "Traceback" not in err


HEAVY = ("openai", "bpe_openai", "services.mesh", "onnxruntime", "torch")
HELP_COMMANDS = [
    [], ["serve"], ["keys", "new"], ["ledger", "report"], ["ledger", "export"], ["economics"],
    ["cache", "train"], ["cache", "eval"], ["router", "eval"], ["workload"], ["eval"],
    ["replay"], ["demo"],
]  # fmt: skip


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "costmesh")
def test_help_loads_none_of_the_heavy_modules(command: list[str]) -> None:
    """`--help` answers at once: it loads neither the mesh, the SDK, the tokenizers nor
    a model runtime (together about 4 s)."""
    probe = (
        "import sys, contextlib, io\n"
        "from costmesh_tools import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    code = cli.main({[*command, '--help']!r})\n"
        "assert code == 0 and 'usage: costmesh' in out.getvalue(), out.getvalue()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
