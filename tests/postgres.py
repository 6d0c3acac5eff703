"""A throwaway PostgreSQL schema per test, on the machine's real server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from tests.unavailable import unavailable

SERVER = os.environ.get("COSTMESH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A postgresql:// URL whose search_path is a new, empty schema, dropped afterwards.

    Skips when no server answers, except under CI=true, where that is a failure.
    """
    try:
        admin = psycopg.connect(SERVER, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL not reachable at {SERVER}: {exc}")
    schema = f"costmesh_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            separator = "&" if "?" in SERVER else "?"
            yield f"{SERVER}{separator}options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
