"""Redis for tests: a key prefix on the machine's server, or a private server to stop."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.unavailable import unavailable

SERVER = os.environ.get("COSTMESH_TEST_REDIS", "redis://127.0.0.1:6379/0")


@contextmanager
def fresh_prefix() -> Iterator[tuple[str, str]]:
    """(url, prefix) on the machine's Redis; every key under the prefix is deleted after."""
    client = redis.Redis.from_url(SERVER, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis not reachable at {SERVER}: {exc}")
    prefix = f"costmesh-test:{uuid.uuid4().hex[:12]}"
    try:
        yield SERVER, prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


class PrivateRedis:
    """A redis-server of the test's own on a free port, which the test may stop."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed: cannot start a private Redis")
        self._binary = str(binary)
        self._directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and return once it logs that it accepts connections."""
        self._process = subprocess.Popen(
            [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self._directory), "--logfile", ""],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if b"Ready to accept connections" in line:
                return
        raise AssertionError(f"redis-server exited with {self._process.wait()} at start")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None
