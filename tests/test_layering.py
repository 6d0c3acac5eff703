"""The layering DESIGN.md draws, checked on every import (lazy ones too):

    costmesh_tools        the CLI, evaluations, training, the case study
    costmesh_simulator    a fake provider, for tests, benchmarks and the keyless demo
    services.mesh         the composition root: starts services (and stand-in simulators)
    services.<service>    cache, router, ledger, inference: each only itself and below
    services.providers    calling providers, shared by inference and the router
    services.common       config, auth, errors, telemetry, embedding, pricing

A service never reaches into another service: it calls it through its protos.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("cache", "router", "ledger", "inference")
SHARED = ("services.common", "services.providers")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def _allowed(importer: str, imported: str) -> bool:
    """Whether `importer` may import `imported` (both dotted, first-party or not)."""
    first_party = ("services", "costmesh_tools", "costmesh_simulator")
    if not any(_under(imported, p) for p in first_party):
        return True  # third-party, the standard library, generated protos
    if _under(importer, "costmesh_tools"):
        return True
    if _under(importer, "costmesh_simulator"):
        return not _under(imported, "costmesh_tools")
    if _under(importer, "services.mesh"):
        return not _under(imported, "costmesh_tools")
    if any(_under(importer, s) for s in SHARED):
        return any(_under(imported, s) for s in SHARED)
    service = importer.split(".")[1]
    return _under(imported, f"services.{service}") or any(_under(imported, s) for s in SHARED)


def _violations() -> list[str]:
    found = []
    for package in ("services", "costmesh_tools", "costmesh_simulator"):
        for path in sorted((ROOT / package).rglob("*.py")):
            importer = _module(path)
            for line, imported in _imports(path):
                if not _allowed(importer, imported):
                    where = path.relative_to(ROOT)
                    found.append(f"{where}:{line}: {importer} imports {imported}")
    return found


def test_no_import_points_up_the_layering() -> None:
    assert _violations() == []


def test_the_check_catches_a_service_reaching_into_another() -> None:
    assert not _allowed("services.router.classifiers", "services.inference.request_path")
    assert not _allowed("services.cache.service", "costmesh_tools.cache.evaluate")
    assert not _allowed("services.common.embedding", "services.cache.semantic")
    assert not _allowed("services.providers.client", "costmesh_simulator.server")
    assert not _allowed("costmesh_simulator.server", "costmesh_tools.cli")
    assert _allowed("services.router.classifiers", "services.providers.client")
    assert _allowed("services.mesh", "costmesh_simulator.stand_in")
    assert _allowed("costmesh_tools.cache.training", "services.cache.semantic")


def test_services_hold_only_what_serves() -> None:
    """No CLI, evaluation or simulator module is left in services/."""
    names = {p.stem for p in (ROOT / "services").rglob("*.py")}
    assert not names & {"cli", "commands", "evaluate", "training", "simulator", "economics"}
