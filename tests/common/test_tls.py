"""TLS and mutual TLS with real certificates: the mesh's gRPC and HTTP ports, calls
between services, and the refusal to put keys on a network in the clear."""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from opentelemetry.sdk.trace import TracerProvider

from costmesh.inference.v1 import inference_pb2_grpc
from costmesh.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from costmesh_simulator import OpenAISimulator
from costmesh_tools.certs import Authority, issue, make_dev_set, new_authority, write_pair
from costmesh_tools.cli import main
from services.common.config import ConfigError, load_config
from services.common.server import RunningServer
from services.mesh import start_mesh
from tests.conftest import AUTH, mesh_env, user_request

SERVICE_KEY = "cm-test-service-key"


@dataclass
class Certs:
    folder: Path

    def __getitem__(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def credentials(
        self, name: str | None = "client", ca: str = "ca.pem"
    ) -> grpc.ChannelCredentials:
        """As a client: trusting `ca`, showing `name`'s certificate (None: none)."""
        return grpc.ssl_channel_credentials(
            self[ca],
            None if name is None else self[f"{name}-key.pem"],
            None if name is None else self[f"{name}.pem"],
        )

    def server_env(self, service: str, mutual: bool = True) -> dict[str, str]:
        env = {
            "COSTMESH_TLS_CERT_FILE": str(self.folder / f"{service}.pem"),
            "COSTMESH_TLS_KEY_FILE": str(self.folder / f"{service}-key.pem"),
        }
        if mutual:
            env["COSTMESH_TLS_CLIENT_CA_FILE"] = str(self.folder / "ca.pem")
        return env


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    make_dev_set(folder)
    stranger = new_authority("someone else's CA")  # a client whose CA the mesh does not trust
    write_pair(folder, "stranger-ca", stranger.cert, stranger.key)
    write_pair(folder, "stranger", *issue(stranger, "client", ["localhost"]))
    ours = new_authority()  # signs nothing the mesh trusts: ca.pem is another CA
    write_pair(folder, "other-ca", ours.cert, ours.key)
    return Certs(folder)


@pytest.fixture
async def mutual_mesh(
    simulator: OpenAISimulator, tmp_path: Path, certs: Certs
) -> AsyncIterator[RunningServer]:
    env = {**mesh_env(simulator, tmp_path), **certs.server_env("inference")}
    running = await start_mesh(
        load_config(env=env), env, ["inference", "cache", "router", "ledger"], TracerProvider(),
        port=0, http_port=0,
    )  # fmt: skip
    try:
        yield running
    finally:
        await running.stop(grace=1)


async def _complete(address: str, credentials: grpc.ChannelCredentials) -> str:
    # The certificates name localhost and 127.0.0.1; the channel dials the address.
    async with grpc.aio.secure_channel(address, credentials) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        reply = await stub.Complete(user_request("Where is my order?"), metadata=AUTH, timeout=10)
        return reply.content


async def test_a_client_with_a_certificate_from_the_mesh_ca_is_answered(
    mutual_mesh: RunningServer, certs: Certs
) -> None:
    content = await _complete(f"localhost:{mutual_mesh.port}", certs.credentials())

    assert content.startswith("[simulated] Answer to: Where is my order?")


@pytest.mark.parametrize(
    ("who", "credentials"),
    [
        ("no client certificate", lambda c: c.credentials(None)),
        ("a certificate from another CA", lambda c: c.credentials("stranger")),
        ("a client that trusts another CA", lambda c: c.credentials("client", ca="other-ca.pem")),
    ],
)
async def test_the_handshake_refuses(
    who: str, credentials: object, mutual_mesh: RunningServer, certs: Certs
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _complete(f"localhost:{mutual_mesh.port}", credentials(certs))  # type: ignore[operator]

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, who


async def test_an_expired_client_certificate_is_refused(
    mutual_mesh: RunningServer, certs: Certs, tmp_path: Path
) -> None:
    authority = _load_authority(certs)
    now = datetime.datetime.now(datetime.UTC)
    expired = issue(
        authority,
        "client",
        ["localhost"],
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    write_pair(tmp_path, "expired", *expired)
    credentials = grpc.ssl_channel_credentials(
        certs["ca.pem"], (tmp_path / "expired-key.pem").read_bytes(),
        (tmp_path / "expired.pem").read_bytes(),
    )  # fmt: skip

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _complete(f"localhost:{mutual_mesh.port}", credentials)

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_client_gets_nothing(mutual_mesh: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mutual_mesh.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Complete(user_request("Hi"), metadata=AUTH, timeout=5)

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_http_front_door_speaks_the_same_mutual_tls(
    mutual_mesh: RunningServer, certs: Certs
) -> None:
    trusting = ssl.create_default_context(cafile=certs.folder / "ca.pem")
    with_cert = ssl.create_default_context(cafile=certs.folder / "ca.pem")
    with_cert.load_cert_chain(certs.folder / "client.pem", certs.folder / "client-key.pem")
    url = f"https://localhost:{mutual_mesh.http_port}/v1/models"
    headers = {"authorization": AUTH[0][1]}

    async with httpx.AsyncClient(verify=with_cert) as http:
        listed = await http.get(url, headers=headers)
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
        async with httpx.AsyncClient(verify=trusting) as http:
            await http.get(url, headers=headers)

    assert listed.status_code == 200
    assert "auto" in [m["id"] for m in listed.json()["data"]]


async def test_inference_calls_its_peers_over_mutual_tls(
    simulator: OpenAISimulator, tmp_path: Path, certs: Certs
) -> None:
    base = {**mesh_env(simulator, tmp_path), "COSTMESH_SERVICE_KEY": SERVICE_KEY}
    peers_env = {**base, **certs.server_env("ledger")}
    peers = await start_mesh(
        load_config(env=peers_env), peers_env, ["cache", "router", "ledger"], TracerProvider(),
        port=0,
    )  # fmt: skip
    address = f"localhost:{peers.port}"
    front_env = {
        **base, "CACHE_ADDR": address, "ROUTER_ADDR": address, "LEDGER_ADDR": address,
        "COSTMESH_PEERS_TLS_CA_FILE": str(certs.folder / "ca.pem"),
        "COSTMESH_PEERS_TLS_CERT_FILE": str(certs.folder / "inference.pem"),
        "COSTMESH_PEERS_TLS_KEY_FILE": str(certs.folder / "inference-key.pem"),
    }  # fmt: skip
    front = await start_mesh(
        load_config(env=front_env), front_env, ["inference"], TracerProvider(), port=0
    )
    try:
        content = await _complete_plain(f"127.0.0.1:{front.port}")
        await front.settled()
        async with grpc.aio.secure_channel(address, certs.credentials()) as channel:
            stream = ledger_pb2_grpc.LedgerServiceStub(channel).ExportUsage(
                ledger_pb2.ExportUsageRequest(), metadata=AUTH, timeout=5
            )
            rows = [item.record async for item in stream]
    finally:
        await front.stop(grace=1)
        await peers.stop(grace=1)

    assert content.startswith("[simulated]")
    assert [r.client_request_id for r in rows] == ["tls-1"]


async def _complete_plain(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = user_request("Where is my order?", request_id="tls-1")
        return (await stub.Complete(request, metadata=AUTH, timeout=10)).content


async def test_plaintext_off_loopback_is_refused_unless_insecure(
    simulator: OpenAISimulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {**mesh_env(simulator, tmp_path), "COSTMESH_HOST": "0.0.0.0", "COSTMESH_API_KEYS": _KEYS}
    with pytest.raises(ConfigError, match=r"server.host: 0.0.0.0 .*\[server.tls\] is not set"):
        await _start(env)
    split = {**mesh_env(simulator, tmp_path), "COSTMESH_SERVICE_KEY": SERVICE_KEY}
    split |= {"CACHE_ADDR": "127.0.0.1:1", "ROUTER_ADDR": "127.0.0.1:1"}
    with pytest.raises(ConfigError, match=r"peers.ledger: ledger.internal:50051 .*\[peers.tls\]"):
        await _start({**split, "LEDGER_ADDR": "ledger.internal:50051"}, ["inference"])

    with caplog.at_level(logging.WARNING):
        running = await _start({**env, "COSTMESH_INSECURE": "true"})
        await running.stop(grace=0)

    assert "WITHOUT TLS (server.insecure = true)" in caplog.text


_KEYS = "ops:admin:" + "ab" * 32  # not the public demo key, which loopback alone may use


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"COSTMESH_TLS_CERT_FILE": "{d}/ledger.pem"}, "server.tls.key_file: required"),
        (
            {
                "COSTMESH_TLS_CERT_FILE": "{d}/ledger.pem",
                "COSTMESH_TLS_KEY_FILE": "{d}/cache-key.pem",
            },
            "not a certificate and its private key",
        ),
        ({"COSTMESH_TLS_CLIENT_CA_FILE": "{d}/ca.pem"}, "client_ca_file: needs"),
        ({"COSTMESH_PEERS_TLS_CERT_FILE": "{d}/inference.pem"}, "peers.tls.ca_file: required"),
        ({"COSTMESH_TLS_CERT_FILE": "{d}/nothing.pem"}, "server.tls.cert_file: cannot read"),
    ],
)
async def test_a_tls_setting_that_cannot_work_fails_the_start_naming_it(
    env: dict[str, str], message: str, certs: Certs, simulator: OpenAISimulator, tmp_path: Path
) -> None:
    filled = {k: v.format(d=certs.folder) for k, v in env.items()}
    with pytest.raises(ConfigError, match=message):
        await _start({**mesh_env(simulator, tmp_path), **filled})


async def _start(env: dict[str, str], names: list[str] | None = None) -> RunningServer:
    names = names or ["inference", "cache", "router", "ledger"]
    return await start_mesh(load_config(env=env), env, names, TracerProvider(), port=0)


def _load_authority(certs: Certs) -> Authority:
    cert = x509.load_pem_x509_certificate(certs["ca.pem"])
    key = serialization.load_pem_private_key(certs["ca-key.pem"], None)
    return Authority(cert, key)  # type: ignore[arg-type]


async def test_the_ledger_report_reaches_a_mutual_tls_mesh_with_the_client_pair(
    mutual_mesh: RunningServer, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    await _complete(f"localhost:{mutual_mesh.port}", certs.credentials())
    await mutual_mesh.settled()
    tls = ["--tls-ca", str(certs.folder / "ca.pem")]
    tls += ["--tls-cert", str(certs.folder / "client.pem")]
    tls += ["--tls-key", str(certs.folder / "client-key.pem")]
    argv = ["ledger", "report", "--addr", f"localhost:{mutual_mesh.port}"]
    argv += ["--key", "cm-demo-admin-key", "--format", "csv", *tls]

    code = await asyncio.to_thread(main, argv)

    assert code == 0
    assert "demo" in capsys.readouterr().out
