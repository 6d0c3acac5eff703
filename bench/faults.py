"""Fault suite: a split deployment under load, one fault at a time, each followed by the
conservation check (every request a caller saw answered has exactly one answer row in
the ledger, no row without an answered request, replies' costs equal the rows' to the
nano-dollar).

The deployment: the ledger and inference are processes of their own (`costmesh serve
ledger|inference`), cache and router are served from this process, the provider is
the simulator (instant unless the fault says otherwise). Inference reaches cache,
router and ledger through TCP fault proxies in this process. Eight callers send
Complete calls with request ids and retry each id until it is answered, as a client
following docs/dispatch.md would.

Faults: sigkill (inference, at random points, --kills times), sigterm (inference),
ledger-kill, redis-kill and redis-hang (the cache on a private redis-server),
provider-storm (30% of provider calls fail), provider-hang (answers take 20 s for a
while), provider-outage (every call fails for 10 s; reports how long errors go on after
the provider is back), net-delay, net-loss and net-partition (between inference and
its peers). The network faults use the proxies: this machine's kernel has no netem
(`tc qdisc add ... netem` answers "Specified qdisc kind is unknown").

    .venv/bin/python bench/faults.py all
    .venv/bin/python bench/faults.py sigkill --kills 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from opentelemetry.sdk.trace import TracerProvider

from costmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh.types.v1 import types_pb2
from costmesh_simulator import OpenAISimulator
from services.common.config import load_config
from services.common.server import RunningServer
from services.mesh import start_mesh

ADMIN = (("authorization", "Bearer cm-demo-admin-key"),)
SERVICE_KEY = "cm-faults-service-key"
PROVIDER_KEY = "sk-faults"
CALLERS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- a TCP proxy that delays, loses and partitions ------------------------------------


@dataclass
class Network:
    """What the proxies do to traffic now (changed while the load runs)."""

    delay: float = 0.0  # seconds added to every chunk, each way
    stall_share: float = 0.0  # share of chunks held back `stall` seconds (a lost segment)
    stall: float = 0.3
    flowing: asyncio.Event = field(default_factory=asyncio.Event)  # clear: partitioned
    links: set[asyncio.StreamWriter] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.flowing.set()

    def partition(self) -> None:
        """Connections are accepted, nothing is forwarded."""
        self.flowing.clear()

    def heal(self) -> None:
        """Back to a clean network; connections held by a partition are cut."""
        self.delay, self.stall_share = 0.0, 0.0
        if not self.flowing.is_set():
            for writer in list(self.links):
                writer.close()
        self.flowing.set()


class Proxy:
    def __init__(self, target: str, network: Network, rng: random.Random) -> None:
        self._host, port = target.rsplit(":", 1)
        self._port = int(port)
        self._network, self._rng = network, rng
        self.address = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        net = self._network
        net.links.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.close()
            net.links.discard(writer)
            return
        net.links.add(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            w.close()
            net.links.discard(w)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        net = self._network
        while chunk := await reader.read(65536):
            await net.flowing.wait()
            if writer.is_closing():
                break
            if net.delay:
                await asyncio.sleep(net.delay)
            if net.stall_share and self._rng.random() < net.stall_share:
                await asyncio.sleep(net.stall)
            writer.write(chunk)
            await writer.drain()
        writer.close()


# -- the deployment ---------------------------------------------------------------------


class Deployment:
    """Ledger and inference as processes; cache and router here; proxies between."""

    def __init__(self, folder: Path, simulator: OpenAISimulator, redis_port: int | None) -> None:
        self.folder, self.simulator, self.redis_port = folder, simulator, redis_port
        self.network = Network()
        self.rng = random.Random(20261206)
        self.inference_port, self.ledger_port = _free_port(), _free_port()
        self.inference: asyncio.subprocess.Process | None = None
        self.ledger: asyncio.subprocess.Process | None = None
        self._peers: RunningServer | None = None
        self._proxies: list[Proxy] = []
        self.redis: RedisServer | None = None

    def _env(self, data: str) -> dict[str, str]:
        return {
            **os.environ, "COSTMESH_SERVICE_KEY": SERVICE_KEY, "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.simulator.base_url, "COSTMESH_HTTP_PORT": "0",
            "COSTMESH_DATA_DIR": str(self.folder / data), "COSTMESH_LOG_LEVEL": "ERROR",
        }  # fmt: skip

    async def start(self) -> None:
        if self.redis_port is not None:
            self.redis = await start_redis(self.redis_port)
        config = self.folder / "peers.toml"
        config.write_text(
            ""
            if self.redis_port is None
            else f'[cache]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:{self.redis_port}/0"\n'
        )
        env = self._env("peers")
        self._peers = await start_mesh(
            load_config(config, env=env), env, ["cache", "router"], TracerProvider(), port=0
        )
        await self.start_ledger()
        peers = Proxy(f"127.0.0.1:{self._peers.port}", self.network, self.rng)
        ledger = Proxy(f"127.0.0.1:{self.ledger_port}", self.network, self.rng)
        for proxy in (peers, ledger):
            await proxy.start()
        self._proxies = [peers, ledger]
        self._inference_env = {
            **self._env("inference"),
            "CACHE_ADDR": peers.address, "ROUTER_ADDR": peers.address,
            "LEDGER_ADDR": ledger.address,
        }  # fmt: skip
        await self.start_inference()

    async def start_ledger(self) -> None:
        self.ledger = await _serve("ledger", self.ledger_port, self._env("ledger"))

    async def start_inference(self) -> None:
        self.inference = await _serve("inference", self.inference_port, self._inference_env)

    @staticmethod
    async def kill(process: asyncio.subprocess.Process | None, how: int) -> None:
        if process is not None and process.returncode is None:
            process.send_signal(how)
            await process.wait()

    async def stop(self) -> None:
        await self.kill(self.inference, signal.SIGTERM)
        await self.kill(self.ledger, signal.SIGTERM)
        for proxy in self._proxies:
            await proxy.stop()
        if self._peers is not None:
            await self._peers.stop(grace=1)
        if self.redis is not None:
            await self.redis.stop()

    async def rows(self) -> list[ledger_pb2.UsageRecord]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.ledger_port}") as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            stream = stub.ExportUsage(ledger_pb2.ExportUsageRequest(), metadata=ADMIN, timeout=30)
            return [item.record async for item in stream]


async def _serve(service: str, port: int, env: dict[str, str]) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "costmesh_tools.cli", "serve", service, "--port", str(port),
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(60):
        while line := (await process.stdout.readline()).decode():
            if line.startswith(f"costmesh: serving {service}"):
                return process
    raise RuntimeError(f"{service} exited with {await process.wait()} before serving")


@dataclass
class RedisServer:
    """A private redis-server this suite can kill, stop and start again."""

    process: asyncio.subprocess.Process
    port: int
    folder: str

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            await self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


async def start_redis(port: int, folder: str | None = None) -> RedisServer:
    folder = folder or tempfile.mkdtemp(prefix="faults-redis-")
    process = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", folder,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(100):
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return RedisServer(process, port, folder)
        await asyncio.sleep(0.05)
    raise RuntimeError("redis-server did not start")


# -- load and the check ------------------------------------------------------------------


@dataclass
class Load:
    """Callers that retry each request id until it is answered."""

    port: int
    replies: dict[str, list[inference_pb2.CompleteResponse]] = field(default_factory=dict)
    errors: list[tuple[float, str]] = field(default_factory=list)  # (time, status)
    _next: int = 0
    _stopping: bool = False

    async def run(self, until: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            await asyncio.gather(*(self._caller(stub, until) for _ in range(CALLERS)))

    async def _caller(
        self, stub: inference_pb2_grpc.InferenceServiceAsyncStub, until: asyncio.Event
    ) -> None:
        while not until.is_set():
            self._next += 1
            request_id = f"req-{self._next}"
            request = inference_pb2.CompleteRequest(
                feature="support",
                request_id=request_id,
                messages=[
                    types_pb2.ChatMessage(
                        role=types_pb2.ROLE_USER,
                        content=f"Order {self._next}: where is my parcel?",
                    )
                ],
            )
            while True:  # the same id until it is answered, even past the end
                try:
                    reply = await stub.Complete(request, metadata=ADMIN, timeout=5)
                except grpc.aio.AioRpcError as exc:
                    self.errors.append((time.monotonic(), exc.code().name))
                    await asyncio.sleep(0.05)
                    continue
                self.replies.setdefault(request_id, []).append(reply)
                break


def conservation(
    rows: list[ledger_pb2.UsageRecord], replies: dict[str, list[inference_pb2.CompleteResponse]]
) -> dict[str, int]:
    answers = Counter(
        r.client_request_id for r in rows if r.purpose == ledger_pb2.CALL_PURPOSE_ANSWER
    )
    cost = Counter[str]()
    for row in rows:
        cost[row.client_request_id] += row.cost_nano_usd
    return {
        "answered": len(replies),
        "doubled": sum(1 for n in answers.values() if n > 1),
        "unbilled": sum(1 for r in replies if answers[r] == 0),
        "orphans": sum(1 for r in answers if r not in replies),
        "replayed differently": sum(
            1 for s in replies.values() if len({r.trace_id for r in s}) > 1
        ),
        "cost mismatches": sum(1 for r, s in replies.items() if cost[r] != s[0].cost_nano_usd),
    }


Fault = Callable[[Deployment, "Run"], Awaitable[dict[str, float]]]


@dataclass
class Run:
    load: Load
    started: float


async def under_load(deployment: Deployment, fault: Fault, warm: float = 1.0) -> dict[str, float]:
    """Start the callers, apply `fault`, stop the callers, settle, check."""
    load = Load(deployment.inference_port)
    until = asyncio.Event()
    callers = asyncio.create_task(load.run(until))
    await asyncio.sleep(warm)
    figures = await fault(deployment, Run(load, time.monotonic()))
    await asyncio.sleep(1.0)  # some calls after the fault too
    until.set()
    await asyncio.wait_for(callers, 120)
    # A clean stop flushes the outbox; the ledger then has every row.
    await deployment.kill(deployment.inference, signal.SIGTERM)
    await deployment.start_inference()
    await asyncio.sleep(1.0)
    rows = await deployment.rows()
    return {**figures, **conservation(rows, load.replies), "client errors": len(load.errors)}


# -- the faults ---------------------------------------------------------------------------


async def sigkill(d: Deployment, run: Run, kills: int = 100) -> dict[str, float]:
    for _ in range(kills):
        await asyncio.sleep(d.rng.uniform(0.05, 0.5))
        await d.kill(d.inference, signal.SIGKILL)
        await d.start_inference()
        await asyncio.sleep(0.3)
    return {"kills": kills}


async def sigterm(d: Deployment, run: Run) -> dict[str, float]:
    await d.kill(d.inference, signal.SIGTERM)
    await d.start_inference()
    return {}


async def ledger_kill(d: Deployment, run: Run) -> dict[str, float]:
    await d.kill(d.ledger, signal.SIGKILL)
    await asyncio.sleep(3)
    await d.start_ledger()
    return {}


async def redis_kill(d: Deployment, run: Run) -> dict[str, float]:
    assert d.redis is not None
    d.redis.process.kill()
    await d.redis.process.wait()
    await asyncio.sleep(3)
    d.redis = await start_redis(d.redis.port, d.redis.folder)
    return {}


async def redis_hang(d: Deployment, run: Run) -> dict[str, float]:
    assert d.redis is not None
    d.redis.process.send_signal(signal.SIGSTOP)
    await asyncio.sleep(3)
    d.redis.process.send_signal(signal.SIGCONT)
    return {}


async def provider_storm(d: Deployment, run: Run) -> dict[str, float]:
    d.simulator.set_failure_rate(0.3, (500, 429), seed=7)
    await asyncio.sleep(5)
    d.simulator.set_failure_rate(0)
    return {}


async def provider_hang(d: Deployment, run: Run) -> dict[str, float]:
    d.simulator.set_latency(20)
    await asyncio.sleep(3)
    d.simulator.set_latency(0)
    return {}


async def provider_outage(d: Deployment, run: Run) -> dict[str, float]:
    d.simulator.set_failure_rate(1.0, (503,))
    await asyncio.sleep(10)
    d.simulator.set_failure_rate(0)
    back = time.monotonic()
    await asyncio.sleep(5)
    after = [t - back for t, _ in run.load.errors if t > back]
    return {"errors after return (s)": round(max(after, default=0.0), 2)}


async def net_delay(d: Deployment, run: Run) -> dict[str, float]:
    d.network.delay = 0.05
    await asyncio.sleep(5)
    d.network.heal()
    return {}


async def net_loss(d: Deployment, run: Run) -> dict[str, float]:
    d.network.stall_share = 0.05
    await asyncio.sleep(5)
    d.network.heal()
    return {}


async def net_partition(d: Deployment, run: Run) -> dict[str, float]:
    d.network.partition()
    await asyncio.sleep(5)
    d.network.heal()
    return {}


FAULTS: dict[str, Fault] = {
    "sigkill": sigkill, "sigterm": sigterm, "ledger-kill": ledger_kill,
    "redis-kill": redis_kill, "redis-hang": redis_hang, "provider-storm": provider_storm,
    "provider-hang": provider_hang, "provider-outage": provider_outage,
    "net-delay": net_delay, "net-loss": net_loss, "net-partition": net_partition,
}  # fmt: skip


@contextlib.asynccontextmanager
async def deployment(redis: bool) -> AsyncIterator[Deployment]:
    with tempfile.TemporaryDirectory() as folder, OpenAISimulator(api_key=PROVIDER_KEY) as sim:
        running = Deployment(Path(folder), sim, _free_port() if redis else None)
        try:
            await running.start()
            yield running
        finally:
            await running.stop()


async def run_fault(name: str, kills: int) -> dict[str, float]:
    fault = FAULTS[name]
    if name == "sigkill":
        fault = lambda d, r: sigkill(d, r, kills)  # noqa: E731
    async with deployment(redis=name.startswith("redis")) as running:
        return await under_load(running, fault)


async def main_async(names: list[str], kills: int) -> None:
    columns = ["answered", "client errors", "doubled", "unbilled", "orphans",
               "replayed differently", "cost mismatches"]  # fmt: skip
    print("| fault | " + " | ".join(columns) + " | other |")
    print("|---|" + "---:|" * len(columns) + "---|")
    for name in names:
        figures = await run_fault(name, kills)
        other = ", ".join(f"{k} {v:g}" for k, v in figures.items() if k not in columns)
        print(f"| {name} | " + " | ".join(f"{figures[c]:g}" for c in columns) + f" | {other} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fault", choices=("all", *FAULTS))
    parser.add_argument("--kills", type=int, default=100, help="SIGKILLs for the sigkill fault")
    args = parser.parse_args()
    names = list(FAULTS) if args.fault == "all" else [args.fault]
    asyncio.run(main_async(names, args.kills))


if __name__ == "__main__":
    main()
