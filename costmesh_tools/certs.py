"""`costmesh certs dev`: a development CA and certificates for the four services and a
client, enough to run the mesh with mutual TLS on one machine or in compose.

Each service's certificate names the service (its common name, which the mesh reads
as its identity) and the hosts it is reached at; it serves and calls peers with the
same pair. Not for production: there, certificates come from your own CA."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services import SERVICES

CLIENT = "client"
_DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_CA_USAGE = x509.KeyUsage(
    digital_signature=True, key_cert_sign=True, crl_sign=True,
    content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, encipher_only=False, decipher_only=False,
)  # fmt: skip


@dataclass(frozen=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def new_authority(name: str = "costmesh development CA", days: int = 825) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def issue(
    authority: Authority,
    name: str,
    hosts: Sequence[str],
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate for `name` (its common name), valid for `hosts`, usable to
    serve and to call (server and client authentication)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([name, *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or now + datetime.timedelta(days=397))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(authority.key, hashes.SHA256())
    )
    return cert, key


def write_pair(
    out: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    """`stem`.pem and `stem`-key.pem (readable by the owner only)."""
    (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = out / f"{stem}-key.pem"
    key_path.write_bytes(b"")
    key_path.chmod(0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_dev_set(out: Path, hosts: Sequence[str] = ()) -> list[Path]:
    """ca.pem (and its key), then a pair per service and one for a client; and a
    folder per service and for the client holding only ca.pem and that one pair, for a
    container to mount without the CA's key or anyone else's."""
    out.mkdir(parents=True, exist_ok=True)
    authority = new_authority()
    write_pair(out, "ca", authority.cert, authority.key)
    every_host = [*_DEFAULT_HOSTS, *hosts]
    for name in (*SERVICES, CLIENT):
        cert, key = issue(authority, name, every_host)
        write_pair(out, name, cert, key)
        own = out / name
        own.mkdir(exist_ok=True)
        write_pair(own, name, cert, key)
        (own / "ca.pem").write_bytes((out / "ca.pem").read_bytes())
    return sorted(out.iterdir())


def is_complete(out: Path) -> bool:
    """A set `make_dev_set` wrote whole, with no certificate expiring within a day."""
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    for name in ("ca", *SERVICES, CLIENT):
        files = [out / f"{name}.pem", out / f"{name}-key.pem"]
        if name != "ca":
            files += [out / name / f"{name}.pem", out / name / f"{name}-key.pem"]
        if not all(f.is_file() and f.stat().st_size for f in files):
            return False
        cert = x509.load_pem_x509_certificate(files[0].read_bytes())
        if cert.not_valid_after_utc < soon:
            return False
    return True


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = commands.add_parser("certs", help="TLS certificates for development")
    sub = certs.add_subparsers(dest="certs_command", required=True)
    dev = sub.add_parser(
        "dev", help="a development CA and certificates for the four services and a client"
    )
    dev.add_argument("--out", type=Path, required=True, help="folder to write them to")
    dev.add_argument(
        "--host",
        action="append",
        default=[],
        help="another name or address the services are reached at (repeatable)",
    )
    dev.add_argument(
        "--keep",
        action="store_true",
        help="leave a whole, unexpired set already in --out as it is (for a container "
        "that runs this at start); a partial or expiring one is made again",
    )
    dev.set_defaults(handler=_dev)


def _dev(args: argparse.Namespace, out: TextIO) -> int:
    if args.keep and is_complete(args.out):
        print(f"keeping the certificates already in {args.out}", file=out)
        return 0
    written = make_dev_set(args.out, args.host)
    print(f"wrote {len(written)} files to {args.out}{os.sep}:", file=out)
    for path in written:
        print(f"  {path.name}", file=out)
    print(
        "serve with COSTMESH_TLS_CERT_FILE=<service>.pem COSTMESH_TLS_KEY_FILE=<service>-key.pem"
        " COSTMESH_TLS_CLIENT_CA_FILE=ca.pem; call peers with COSTMESH_PEERS_TLS_CA_FILE=ca.pem"
        " and the service's own pair (docs/security.md)",
        file=out,
    )
    return 0
