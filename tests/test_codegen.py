"""Clients for other languages come from the same protos: buf.gen.yaml generates
TypeScript (which type-checks in strict mode with a caller's use) and Go (messages and
gRPC stubs, at the protos' go_package paths)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unavailable import unavailable

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "node_modules" / ".bin"
PROTOS = sorted(p.stem for p in (ROOT / "protos").glob("costmesh/*/v1/*.proto"))
CALLER = """
import { create, toBinary } from "@bufbuild/protobuf";
import { CompleteRequestSchema } from "./gen/ts/costmesh/inference/v1/inference_pb";
import { Role } from "./gen/ts/costmesh/types/v1/types_pb";

const request = create(CompleteRequestSchema, {
  feature: "support",
  messages: [{ role: Role.USER, content: "Where is my order?" }],
});
export const bytes: Uint8Array = toBinary(CompleteRequestSchema, request);
"""


SERVICES = ("cache", "inference", "ledger", "router")


def _tools() -> None:
    missing = [t for t in ("buf", "protoc-gen-es", "tsc") if not (BIN / t).exists()]
    if missing or shutil.which("node") is None:
        unavailable(f"node or {', '.join(missing) or 'node'} missing: run `npm ci`")
    go = [t for t in ("protoc-gen-go", "protoc-gen-go-grpc") if shutil.which(t) is None]
    if go:
        unavailable(f"{', '.join(go)} missing: apt-get install -y protoc-gen-go protoc-gen-go-grpc")


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
    )  # fmt: skip
    assert done.returncode == 0, f"{command[0]}: {done.stdout[-2000:]}{done.stderr[-2000:]}"


def test_typescript_and_go_are_generated_for_every_proto(tmp_path: Path) -> None:
    _tools()
    _run([str(BIN / "buf"), "generate", "--template", "buf.gen.yaml", "-o", str(tmp_path)], ROOT)
    generated = sorted(p.name for p in tmp_path.glob("gen/ts/costmesh/*/v1/*_pb.ts"))
    assert generated == sorted(f"{name}_pb.ts" for name in PROTOS)
    go = sorted(p.name for p in tmp_path.glob("gen/go/costmesh/*/v1/*.go"))
    assert go == sorted([f"{n}.pb.go" for n in PROTOS] + [f"{n}_grpc.pb.go" for n in SERVICES])
    stub = (tmp_path / "gen/go/costmesh/inference/v1/inference_grpc.pb.go").read_text()
    assert "package inferencev1" in stub
    assert "func NewInferenceServiceClient(" in stub

    (tmp_path / "node_modules").symlink_to(ROOT / "node_modules")
    (tmp_path / "caller.ts").write_text(CALLER)
    options = {"strict": True, "noEmit": True, "target": "ES2022", "module": "ES2022",
               "moduleResolution": "bundler", "skipLibCheck": True}  # fmt: skip
    config = {"compilerOptions": options, "include": ["caller.ts", "gen/ts/**/*.ts"]}
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    _run([str(BIN / "tsc"), "-p", "tsconfig.json"], tmp_path)


@pytest.mark.parametrize("option", ["go_package", "java_package", "csharp_namespace"])
def test_every_proto_names_its_package_for_other_generators(option: str) -> None:
    for path in (ROOT / "protos").glob("costmesh/*/v1/*.proto"):
        assert f"option {option} = " in path.read_text(encoding="utf-8"), path.name
