"""The README's five-minute tour works as written.

`costmesh serve` runs on its defaults (127.0.0.1:50051 and :8080, as the tour
assumes); every Python snippet of the tour runs in one interpreter, in order, as a
reader pastes them; every `costmesh` command and `export` line runs in one shell, in
order. Commands that need what a test machine lacks (make serve in a second terminal,
docker, grpcurl) are the only ones left out."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.config import ENV_OVERRIDES
from tests.unavailable import unavailable

ROOT = Path(__file__).resolve().parent.parent
COSTMESH = Path(sys.executable).parent / "costmesh"


def tour() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", tour(), flags=re.DOTALL)


def shell_lines() -> list[str]:
    """Indented command lines the tour asks to type (comments stripped)."""
    lines = [m.split("  #")[0].strip() for m in re.findall(r"(?m)^    (\S.*)$", tour())]
    return [line for line in lines if line.startswith((".venv/bin/costmesh", "export "))]


def test_the_tour_reader_finds_the_snippets_and_commands() -> None:
    assert len(python_snippets()) >= 3
    assert any(line.startswith(".venv/bin/costmesh ledger") for line in shell_lines())


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Path]:
    for port in (50051, 8080):
        if not _port_free(port):  # `make serve` in another terminal, say
            unavailable(f"127.0.0.1:{port} is taken: the tour runs the mesh on its defaults")
    ours = ("COSTMESH_", "OPENAI_", "OTEL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours) and k not in ENV_OVERRIDES}
    env["COSTMESH_DATA_DIR"] = str(tmp_path / "data")
    log = tmp_path / "serve.log"
    with log.open("w") as stderr, subprocess.Popen(
        [str(COSTMESH), "serve"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=stderr, text=True,
    ) as process:  # fmt: skip
        try:
            assert process.stdout is not None
            ready = False
            for line in process.stdout:  # until the HTTP line, or the end if serve died
                if "OpenAI-compatible API" in line:
                    ready = True
                    break
            assert ready, f"costmesh serve did not start: {log.read_text()}"
            yield tmp_path
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_every_tour_snippet_and_command_runs_as_written(served: Path) -> None:
    program = "\n".join(python_snippets())
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=served, capture_output=True, text=True,
        check=False, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[simulated]" in done.stdout  # the answers were printed

    venv = ROOT / ".venv" / "bin"
    script = "set -e\n" + "\n".join(
        line.replace(".venv/bin/", f"{venv}/", 1) for line in shell_lines()
    )
    shell = subprocess.run(
        ["bash", "-c", script], cwd=served, capture_output=True, text=True, check=False,
        timeout=120, env={k: v for k, v in os.environ.items() if k != "COSTMESH_API_KEY"},
    )  # fmt: skip
    assert shell.returncode == 0, shell.stderr[-3000:]
    assert "key (give it to the team" in shell.stdout
    assert "support" in shell.stdout  # the report shows the tour's calls
    chargeback = (served / "chargeback.csv").read_text().splitlines()
    assert chargeback[0].startswith("team,feature,")
    assert any(line.startswith("demo,support,") for line in chargeback)
    focus = (served / "focus.csv").read_text().splitlines()
    assert focus[0].startswith("BilledCost,")
    assert len(focus) > 1  # the tour's calls, billed
