"""Regenerate the Python code and type stubs of every proto under protos/."""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def main() -> int:
    """Delete the old output, run protoc with the mypy plugins, add package markers."""
    for old in PROTOS.glob("costmesh/**/*_pb2*.py*"):
        old.unlink()
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.glob("costmesh/**/*.proto"))
    bin_dir = Path(sys.executable).parent
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={PROTOS}",
            f"--grpc_python_out={PROTOS}",
            f"--mypy_out={PROTOS}",
            f"--mypy_grpc_out={PROTOS}",
            *sources,
        ]
    )
    if code != 0:
        return int(code)
    for leaf in {PROTOS / Path(s).parent for s in sources}:
        for folder in [leaf, *leaf.parents]:
            if folder == PROTOS:
                break
            (folder / "__init__.py").touch()
    (PROTOS / "costmesh" / "py.typed").touch()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
