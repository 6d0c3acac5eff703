"""TLS for the mesh's ports and for calls between services: certificates from files
named in [server.tls] and [peers.tls], mutual TLS when a client CA is given, and the
rule that keys never cross a network in the clear unless an operator says so."""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.config import Config, ConfigError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """`host` (a name or address, with or without a :port) reaches only this machine."""
    bare = host.strip()
    if bare.startswith("["):
        bare = bare[1 : bare.find("]")]
    elif bare.count(":") == 1:
        bare = bare.rsplit(":", 1)[0]
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerTls:
    """What the gRPC and HTTP ports present, and (mTLS) the CA client certificates
    must chain to; without `client_ca_file` a client needs no certificate."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        client_ca = None if self.client_ca_file is None else self.client_ca_file.read_bytes()
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def http_options(self) -> dict[str, object]:
        """uvicorn's settings for the same certificate and client CA."""
        options: dict[str, object] = {
            "ssl_certfile": str(self.cert_file),
            "ssl_keyfile": str(self.key_file),
        }
        if self.client_ca_file is not None:
            options["ssl_ca_certs"] = str(self.client_ca_file)
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        return options


@dataclass(frozen=True)
class PeerTls:
    """How this process checks its peers' certificates, and the certificate it shows
    them (needed where peers require mTLS)."""

    ca_file: Path
    cert_file: Path | None
    key_file: Path | None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=None if self.key_file is None else self.key_file.read_bytes(),
            certificate_chain=None if self.cert_file is None else self.cert_file.read_bytes(),
        )


def server_tls(config: Config) -> ServerTls | None:
    """[server.tls], checked: a certificate and its key together, files readable."""
    tls = config.section("server").section("tls")
    cert, key = _file(tls, "cert_file"), _file(tls, "key_file")
    client_ca = _file(tls, "client_ca_file")
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("server.tls.client_ca_file: needs server.tls.cert_file and key_file")
        return None
    if cert is None or key is None:
        missing = "cert_file" if cert is None else "key_file"
        raise ConfigError(f"server.tls.{missing}: required with the other of cert_file, key_file")
    _check_pair(tls, cert, key)
    if client_ca is not None:
        _check_ca(tls, "client_ca_file", client_ca)
    return ServerTls(cert, key, client_ca)


def peer_tls(config: Config) -> PeerTls | None:
    """[peers.tls], checked: the CA to trust, and optionally this process's own pair."""
    tls = config.section("peers").section("tls")
    ca, cert, key = _file(tls, "ca_file"), _file(tls, "cert_file"), _file(tls, "key_file")
    if ca is None:
        if cert is not None or key is not None:
            raise ConfigError("peers.tls.ca_file: required to call peers over TLS")
        return None
    if (cert is None) != (key is None):
        missing = "cert_file" if cert is None else "key_file"
        raise ConfigError(f"peers.tls.{missing}: required with the other of cert_file, key_file")
    _check_ca(tls, "ca_file", ca)
    if cert is not None and key is not None:
        _check_pair(tls, cert, key)
    return PeerTls(ca, cert, key)


def insecure(config: Config) -> bool:
    return config.section("server").get_bool("insecure", False)


def check_plaintext(config: Config, host: str, tls: ServerTls | None) -> None:
    """Plaintext only on loopback, unless `server.insecure = true` (then logged)."""
    if tls is not None or is_loopback(host):
        return
    if not insecure(config):
        raise ConfigError(
            f"server.host: {host} is reachable from other machines and [server.tls] is not "
            "set, so API keys would cross the network in the clear; set server.tls.cert_file "
            "and key_file (`costmesh certs dev` makes a development set), or server.insecure "
            "= true to accept plaintext"
        )
    log.warning("listening on %s WITHOUT TLS (server.insecure = true)", host)


def check_peer_plaintext(config: Config, peer: str, address: str, tls: PeerTls | None) -> None:
    """A peer off loopback is called over TLS, unless `server.insecure = true`."""
    if tls is not None or is_loopback(address) or insecure(config):
        return
    raise ConfigError(
        f"peers.{peer}: {address} is not on loopback and [peers.tls] is not set, so the "
        "service key would cross the network in the clear; set peers.tls.ca_file (and "
        "cert_file, key_file for mTLS), or server.insecure = true to accept plaintext"
    )


def _file(table: Config, key: str) -> Path | None:
    name = table.get_str(key, "")
    if not name:
        return None
    path = Path(name)
    try:
        path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{table.key_name(key)}: cannot read {name}: {exc.strerror}") from exc
    return path


def _check_ca(table: Config, key: str, path: Path) -> None:
    """CA certificates in PEM (else every handshake fails, or the port cannot open)."""
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"{table.key_name(key)}: {path} holds no CA certificate in PEM ({exc})"
        ) from exc


def _check_pair(table: Config, cert: Path, key: Path) -> None:
    """The certificate and key load and belong together (else the port would refuse
    every handshake with nothing in the log saying why)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"{table.key_name('cert_file')}: {cert} and {key} are not a certificate and its "
            f"private key in PEM ({exc})"
        ) from exc
