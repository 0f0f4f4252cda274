"""`fedcore pki`: a private CA for one federation, the server's certificate, and one kit per
site. A site's identity is the common name of its certificate; the CA key never leaves DIR.

    DIR/ca.crt  DIR/ca.key  DIR/server.crt  DIR/server.key
    DIR/sites/NAME/ca.crt  DIR/sites/NAME/site.crt  DIR/sites/NAME/site.key
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcore.errors import ConfigError

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
VALIDITY = dt.timedelta(days=825)


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes for one end of a mutual-TLS connection."""

    ca: bytes
    certificate: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # O_CREAT's mode does not apply to a file that already existed
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server_hosts: list[str] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca:
        usage = dict(key_cert_sign=True, crl_sign=True, digital_signature=False)
    else:
        usage = dict(key_cert_sign=False, crl_sign=False, digital_signature=True)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
        purpose = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    builder = builder.add_extension(
        x509.KeyUsage(
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            encipher_only=False,
            decipher_only=False,
            **usage,
        ),
        critical=True,
    )
    if server_hosts:
        alt: list[x509.GeneralName] = []
        for host in server_hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def init(directory: Path, hosts: list[str]) -> None:
    """Create the CA and the server's certificate for `hosts` (names or IP addresses)."""
    if (directory / "ca.key").exists():
        raise ConfigError(f"{directory} already holds a CA; use another directory or `fedcore pki add-site`")
    if not hosts:
        raise ConfigError("give the server's host name or address with --host")
    ca_key = _key()
    ca_cert = _certificate("fedcore CA", ca_key.public_key(), None, ca_key, ca=True)
    server_key = _key()
    server_cert = _certificate(hosts[0], server_key.public_key(), ca_cert, ca_key, server_hosts=hosts)
    pem = serialization.Encoding.PEM
    _write(directory / "ca.key", _pem_key(ca_key), secret=True)
    _write(directory / "ca.crt", ca_cert.public_bytes(pem))
    _write(directory / "server.key", _pem_key(server_key), secret=True)
    _write(directory / "server.crt", server_cert.public_bytes(pem))


def add_site(directory: Path, name: str) -> Path:
    """Write the kit of site `name`: the CA certificate and the site's own key and certificate."""
    if not SITE_NAME.match(name):
        raise ConfigError(f"site name {name!r} must be 1-63 letters, digits, '.', '_' or '-'")
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"{directory} holds no CA; run `fedcore pki init {directory} --host HOST` first"
        ) from None
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    kit = directory / "sites" / name
    if kit.exists():
        raise ConfigError(f"site {name!r} already has a kit in {kit}")
    key = _key()
    cert = _certificate(name, key.public_key(), ca_cert, ca_key)
    pem = serialization.Encoding.PEM
    _write(kit / "ca.crt", ca_cert.public_bytes(pem))
    _write(kit / "site.crt", cert.public_bytes(pem))
    _write(kit / "site.key", _pem_key(key), secret=True)
    return kit


def _read(directory: Path, cert: str, key: str) -> TlsFiles:
    try:
        return TlsFiles(
            ca=(directory / "ca.crt").read_bytes(),
            certificate=(directory / cert).read_bytes(),
            key=(directory / key).read_bytes(),
        )
    except FileNotFoundError as err:
        raise ConfigError(
            f"{directory} is missing {Path(err.filename).name}; see `fedcore pki --help`"
        ) from None


def server_files(directory: Path) -> TlsFiles:
    return _read(directory, "server.crt", "server.key")


def site_files(kit: Path) -> TlsFiles:
    return _read(kit, "site.crt", "site.key")


def certificate_name(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
