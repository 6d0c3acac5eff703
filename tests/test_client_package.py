"""costmesh-client: a caller installs the contracts and stubs, not the server.

The wheel is built from protos/ as a user would (`pip install ./protos`), installed
into a new virtualenv with nothing else, and that interpreter calls a running mesh."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import DEMO_KEY, Mesh

PROTOS = Path(__file__).resolve().parent.parent / "protos"
LIMIT_MB = 30  # the target for a client install


def _run(*command: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, check=False, cwd=cwd, timeout=300
    )
    assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("client") / "protos"
    shutil.copytree(PROTOS, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    out = source.parent / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", out, source)  # fmt: skip
    (built,) = out.glob("costmesh_client-*.whl")
    return built


def test_the_wheel_holds_only_the_contracts_and_needs_only_grpcio_and_protobuf(
    wheel: Path,
) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"costmesh"}
    assert "costmesh/inference/v1/inference_pb2_grpc.py" in names
    assert "costmesh/inference/v1/inference.proto" in names
    required = sorted(
        line.split(":", 1)[1].split("<")[0].split(">")[0].split(";")[0].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    )
    assert required == ["grpcio", "protobuf"]


@pytest.fixture(scope="module")
def client_python(wheel: Path) -> Path:
    venv = wheel.parent.parent / "venv"
    _run(sys.executable, "-m", "venv", venv)
    _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         wheel)  # fmt: skip
    return venv / "bin" / "python"


def test_the_client_install_is_small(client_python: Path) -> None:
    site = Path(
        _run(
            client_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        ).strip()
    )
    tools = {"pip", "setuptools", "_distutils_hack"}
    size = sum(
        f.stat().st_size
        for f in site.rglob("*")
        if f.is_file() and f.relative_to(site).parts[0].split("-")[0] not in tools
    )
    assert size < LIMIT_MB * 1_000_000, f"{size / 1e6:.1f} MB"


async def test_a_caller_with_only_the_client_package_completes_a_request(
    client_python: Path, mesh: Mesh
) -> None:
    script = f"""
import grpc
from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.types.v1 import types_pb2
with grpc.insecure_channel({mesh.address!r}) as channel:
    reply = inference_pb2_grpc.InferenceServiceStub(channel).Complete(
        inference_pb2.CompleteRequest(feature="support", messages=[types_pb2.ChatMessage(
            role=types_pb2.ROLE_USER, content="How do I reset my password?")]),
        metadata=(("authorization", "Bearer {DEMO_KEY}"),), timeout=20)
import sys
print(reply.model, reply.cost_nano_usd, "services" in sys.modules)
"""
    process = await asyncio.create_subprocess_exec(
        str(client_python), "-c", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    model, cost, server_loaded = out.decode().split()
    assert model == "gpt-4o-mini"
    assert int(cost) > 0
    assert server_loaded == "False"
